"""The inference service's grammar stage: a request naming a stored grammar gets its text as the output
constraint; the registry's answers become errors that name the caller's field. The registry here is a
stand-in that answers as the Grammars service would (error paths); tests/grammars/test_grammars_stack.py
shows the real one constraining generations."""

from __future__ import annotations

import grpc
import pytest
from ferry.auth.v1.auth_pb2 import Principal
from ferry.grammars.v1 import grammars_pb2
from pydantic import SecretStr

from backends.llamacpp.contract import ConstraintKind, OutputConstraint
from services.common.config import AuthSettings, Settings
from services.common.context import EDGE_HEADER, PRINCIPAL_HEADER
from services.common.errors import RpcError
from services.inference.grammar_resolve import GrammarsClient, ResolveGrammar
from tests.inference.test_wire_parsing import chat, generate

Grammar = grammars_pb2.Grammar


class Registry:
    def __init__(self, answer: Grammar | grpc.StatusCode) -> None:
        self.answer = answer
        self.asked: list[tuple[str, Principal | None]] = []

    async def get(self, name: str, principal: Principal | None) -> Grammar:
        self.asked.append((name, principal))
        if isinstance(self.answer, grpc.StatusCode):
            raise grpc.aio.AioRpcError(self.answer, grpc.aio.Metadata(), grpc.aio.Metadata(), "no")
        return self.answer


async def test_a_named_grammar_becomes_the_constraint() -> None:
    stored = Grammar(name="grammars/yes-no", syntax=Grammar.Syntax.SYNTAX_GBNF, definition='root ::= "yes"')
    registry = Registry(stored)
    caller = Principal(name="keys/abc", scopes=["inference"])
    request = await ResolveGrammar(registry)(chat(grammar={"name": "grammars/yes-no"}), caller)
    assert request.sampling.constraint == OutputConstraint(kind=ConstraintKind.GBNF, grammar='root ::= "yes"')
    assert registry.asked == [("grammars/yes-no", caller)]
    plain = chat()
    assert await ResolveGrammar(registry)(plain, caller) is plain and len(registry.asked) == 1


@pytest.mark.parametrize(
    ("request_field", "body"),
    [
        ("grammar.name", {"grammar": {"name": "grammars/gone"}}),
        ("constraint.grammar", {"prompt": "Hi", "constraint": {"grammar": "grammars/gone"}}),
    ],
)
async def test_an_unknown_grammar_is_not_found_naming_the_callers_field(
    request_field: str, body: dict
) -> None:  # type: ignore[type-arg]
    request = chat(**body) if request_field.startswith("grammar") else generate(**body)
    for answer in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        with pytest.raises(RpcError) as err:
            await ResolveGrammar(Registry(answer))(request, None)
        assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.reason == "GRAMMAR_NOT_FOUND"
        assert err.value.field_violations[0][0] == request_field
        assert err.value.metadata["field"] == request_field


async def test_a_registry_that_does_not_answer_is_unavailable_never_unconstrained() -> None:
    request = chat(grammar={"name": "grammars/x"})
    for resolve in (ResolveGrammar(Registry(grpc.StatusCode.UNAVAILABLE)), ResolveGrammar(None)):
        with pytest.raises(RpcError) as err:
            await resolve(request, None)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.reason == "GRAMMARS_UNAVAILABLE"
        assert err.value.retry_after_seconds is not None
    with pytest.raises(RpcError) as denied:
        await ResolveGrammar(Registry(grpc.StatusCode.PERMISSION_DENIED))(request, None)
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_the_read_carries_the_callers_principal_beside_the_service_token() -> None:
    settings = Settings(auth=AuthSettings(service_token=SecretStr("s3cret")))
    client = GrammarsClient(settings)
    sent = dict(client._metadata(Principal(name="keys/abc", scopes=["inference"])))
    assert sent[EDGE_HEADER] == "Bearer s3cret" and sent[PRINCIPAL_HEADER]
    assert EDGE_HEADER not in dict(client._metadata(None))
    assert EDGE_HEADER not in dict(
        GrammarsClient(Settings(auth=AuthSettings(enabled=False)))._metadata(Principal())
    )
