"""The registry's pure logic: what a grammar may hold, what an update mask may name, and the engine
constraint a stored grammar stands for."""

from __future__ import annotations

import grpc
import pytest
from ferry.grammars.v1 import grammars_pb2

from backends.llamacpp.contract import MAX_CONSTRAINT_BYTES, ConstraintKind, OutputConstraint
from services.common.errors import RpcError
from services.common.names import GRAMMAR_ID
from services.grammars.domain import WRITABLE, GrammarFields, Syntax, update_paths

Grammar = grammars_pb2.Grammar
GBNF = Grammar.Syntax.SYNTAX_GBNF


def _refused(call: object, *args: object) -> RpcError:
    with pytest.raises(RpcError) as err:
        call(*args)  # type: ignore[operator]
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value


def test_fields_from_a_create() -> None:
    fields = GrammarFields.from_proto(
        Grammar(display_name=" Yes/no ", syntax=GBNF, definition='root ::= "y"')
    )
    assert fields == GrammarFields("Yes/no", "", Syntax.GBNF, 'root ::= "y"')
    assert fields.constraint() == OutputConstraint(kind=ConstraintKind.GBNF, grammar='root ::= "y"')
    lark = GrammarFields.from_proto(Grammar(syntax=Grammar.Syntax.SYNTAX_LARK, definition='start: "a"'))
    assert lark.constraint().kind is ConstraintKind.LARK
    assert Syntax.LARK.to_proto() == Grammar.Syntax.SYNTAX_LARK


@pytest.mark.parametrize(
    ("grammar", "field"),
    [
        (Grammar(definition="root ::= x"), "grammar.syntax"),
        (Grammar(syntax=GBNF), "grammar.definition"),
        (Grammar(syntax=GBNF, definition=" \n"), "grammar.definition"),
        (Grammar(syntax=GBNF, definition="root ::= \x00"), "grammar.definition"),
        (Grammar(syntax=GBNF, definition="x" * (MAX_CONSTRAINT_BYTES + 1)), "grammar.definition"),
        (Grammar(syntax=GBNF, definition="root ::= x", display_name="n" * 201), "grammar.display_name"),
        (Grammar(syntax=7, definition="root ::= x"), "grammar.syntax"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_field_is_named(grammar: Grammar, field: str) -> None:
    assert _refused(GrammarFields.from_proto, grammar).field_violations[0][0] == field


def test_update_mask() -> None:
    assert update_paths([]) == list(WRITABLE) == update_paths(["*"])
    assert update_paths(["definition", "definition"]) == ["definition"]
    for path in ("name", "etag", "creator", "create_time", "bogus"):
        assert _refused(update_paths, [path]).field_violations[0][0] == "update_mask"


def test_an_update_takes_only_the_masked_fields() -> None:
    current = GrammarFields("a", "b", Syntax.GBNF, 'root ::= "x"')
    wire = Grammar(
        display_name="new", description="ignored", syntax=Grammar.Syntax.SYNTAX_LARK, definition="d"
    )
    assert current.updated(wire, ["display_name"]) == GrammarFields("new", "b", Syntax.GBNF, 'root ::= "x"')
    # A masked required field must be valid: clearing the definition is refused.
    assert _refused(current.updated, Grammar(), ["definition"]).field_violations[0][0] == "grammar.definition"


def test_grammar_ids() -> None:
    for good in ("a", "yes-no", "g-0123456789ab", "a" * 63):
        assert GRAMMAR_ID.match(good), good
    for bad in ("", "1abc", "Yes", "a_b", "a" * 64, "a/b", "abc\n"):
        assert not GRAMMAR_ID.match(bad), bad
