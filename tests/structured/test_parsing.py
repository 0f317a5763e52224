"""Structured-output fields on the wire (pure logic): response_format, the grammar extension, the native
constraint and logit_bias become the engine contract's values; every refusal names the caller's field;
OpenAI-defined fields ferry cannot honour are refused by name; a JSON answer is checked after "stop"."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from backends.llamacpp.contract import ConstraintKind, OutputConstraint
from services.common.errors import RpcError
from services.inference.domain import Outcome
from services.inference.structured import ENGINE_DECIMALS, answer_schema, check_answer
from tests.inference.test_wire_parsing import chat, completion, generate, refused

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
NATIVE_PROMPT = {"prompt": "Once"}


def test_text_response_format_is_free_output() -> None:
    request = chat(response_format={"type": "text"})
    assert request.sampling.constraint is None and request.grammar_name == ""


def test_json_object_response_format() -> None:
    request = chat(response_format={"type": "json_object"})
    assert request.sampling.constraint == OutputConstraint(kind=ConstraintKind.JSON_OBJECT)
    # An engine refusal of the constraint names the caller's field.
    assert request.spelling.field("constraint") == "response_format"


def test_json_schema_response_format_keeps_the_schema_as_written() -> None:
    request = chat(response_format=JSON_SCHEMA)
    constraint = request.sampling.constraint
    assert constraint is not None and constraint.kind is ConstraintKind.JSON_SCHEMA
    # Integral numbers come back as ints (the wire's Struct holds doubles); the engine is asked for
    # compact JSON (no free whitespace for a small model to ramble in).
    assert constraint.json_schema == {**SCHEMA, "x-guidance": {"whitespace_flexible": False}}
    assert isinstance(constraint.json_schema["properties"]["age"]["minimum"], int)


def test_numbers_get_bounded_decimals_for_the_engine_but_answers_follow_the_callers_schema() -> None:
    score = {"type": "number", "minimum": 0, "maximum": 1}
    own = {"type": "number", "multipleOf": 0.5}
    schema = {
        "type": "object",
        "properties": {"score": score, "half": own, "maybe": {"anyOf": [score, {"type": "null"}]}},
        "required": ["score", "half", "maybe"],
        "$defs": {"n": {"type": ["number", "null"]}, "e": {"enum": [{"type": "number"}]}},
    }
    body = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    engine = chat(response_format=body).sampling.constraint
    assert engine is not None and engine.json_schema is not None
    assert engine.json_schema["properties"]["score"]["multipleOf"] == ENGINE_DECIMALS
    assert engine.json_schema["properties"]["half"]["multipleOf"] == 0.5
    assert engine.json_schema["properties"]["maybe"]["anyOf"][0]["multipleOf"] == ENGINE_DECIMALS
    assert engine.json_schema["$defs"]["n"]["multipleOf"] == ENGINE_DECIMALS
    assert engine.json_schema["$defs"]["e"] == {"enum": [{"type": "number"}]}  # data, not a schema
    assert engine.json_schema["additionalProperties"] is False
    assert answer_schema(engine.json_schema) == {**schema, "additionalProperties": False}
    # 0.3 is not a float multiple of 1e-8 to a validator (0.3 / 1e-8 is not integral): not checked.
    check_answer(chat(response_format=body), answered('{"score": 0.3, "half": 1.5, "maybe": null}', "stop"))


def test_objects_get_no_properties_beyond_the_named_ones_unless_the_schema_says() -> None:
    named = {"type": "object", "properties": {"a": {"type": "string"}}}
    free = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "additionalProperties": {"type": "integer"},
    }
    bare = {"type": "object"}
    schema = {"type": "object", "properties": {"named": named, "free": free, "bare": bare}}
    body = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    engine = chat(response_format=body).sampling.constraint
    assert engine is not None and engine.json_schema is not None
    properties = engine.json_schema["properties"]
    assert properties["named"]["additionalProperties"] is False
    assert properties["free"]["additionalProperties"] == {"type": "integer"}
    assert properties["bare"] == bare


def test_a_callers_own_engine_options_win() -> None:
    own = {**SCHEMA, "x-guidance": {"whitespace_flexible": True}}
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": own}})
    assert request.sampling.constraint is not None and request.sampling.constraint.json_schema == own


def test_completions_take_response_format_too() -> None:
    request = completion(response_format=JSON_SCHEMA)
    assert request.sampling.constraint is not None
    assert request.sampling.constraint.kind is ConstraintKind.JSON_SCHEMA
    assert request.spelling.field("constraint") == "response_format"


@pytest.mark.parametrize(
    ("grammar", "kind", "field"),
    [
        ({"gbnf": 'root ::= "yes" | "no"'}, ConstraintKind.GBNF, "grammar.gbnf"),
        ({"lark": 'start: "yes" | "no"'}, ConstraintKind.LARK, "grammar.lark"),
    ],
)
def test_inline_grammars(grammar: dict[str, str], kind: ConstraintKind, field: str) -> None:
    for parse in (chat, completion):
        request = parse(grammar=grammar)
        assert request.sampling.constraint is not None
        assert request.sampling.constraint.kind is kind
        assert request.sampling.constraint.grammar == next(iter(grammar.values()))
        assert request.spelling.field("constraint") == field


def test_a_stored_grammar_is_carried_by_name_for_the_grammar_stage() -> None:
    request = chat(grammar={"name": "grammars/yes-no"})
    assert request.sampling.constraint is None and request.grammar_name == "grammars/yes-no"
    assert request.spelling.field("grammar_name") == "grammar.name"
    assert request.recorded_parameters()["grammar"] == "grammars/yes-no"


def test_the_record_keeps_the_constraints_kind_not_its_schema() -> None:
    parameters = chat(response_format=JSON_SCHEMA, logit_bias={"5": -100}).recorded_parameters()
    assert parameters["constraint"] == "json_schema"
    assert parameters["logit_bias"] == {"5": -100.0}


@pytest.mark.parametrize(
    ("constraint", "kind", "field"),
    [
        ({"json_object": {}}, ConstraintKind.JSON_OBJECT, "constraint.json_object"),
        ({"json_schema": {"schema": SCHEMA}}, ConstraintKind.JSON_SCHEMA, "constraint.json_schema"),
        ({"gbnf": 'root ::= "a"'}, ConstraintKind.GBNF, "constraint.gbnf"),
        ({"lark": 'start: "a"'}, ConstraintKind.LARK, "constraint.lark"),
    ],
)
def test_native_constraints(constraint: dict[str, Any], kind: ConstraintKind, field: str) -> None:
    request = generate(**NATIVE_PROMPT, constraint=constraint)
    assert request.sampling.constraint is not None and request.sampling.constraint.kind is kind
    assert request.spelling.field("constraint") == field


def test_native_stored_grammar_and_logit_bias() -> None:
    request = generate(
        **NATIVE_PROMPT, constraint={"grammar": "grammars/yes-no"}, sampling={"logit_bias": {"7": 2.5}}
    )
    assert request.grammar_name == "grammars/yes-no"
    assert request.sampling.logit_bias == {7: 2.5}


def test_logit_bias_keys_become_token_ids() -> None:
    for parse in (chat, completion):
        assert parse(logit_bias={"50256": -100, "11": 100}).sampling.logit_bias == {50256: -100.0, 11: 100.0}
        assert parse(logit_bias={}).sampling.logit_bias is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_object", "json_schema": {"name": "p"}}},
            "response_format.json_schema",
        ),
        ({"grammar": {}}, "grammar"),
        ({"grammar": {"gbnf": ""}}, "grammar.gbnf"),
        ({"grammar": {"lark": "   "}}, "grammar.lark"),
        ({"grammar": {"name": "yes-no"}}, "grammar.name"),
        ({"grammar": {"name": "models/yes-no"}}, "grammar.name"),
        ({"grammar": {"gbnf": "x" * (256 * 1024 + 1)}}, "grammar.gbnf"),
        ({"response_format": {"type": "json_object"}, "grammar": {"gbnf": 'root ::= "a"'}}, "grammar"),
        ({"logit_bias": {"hello": 5}}, "logit_bias.hello"),
        ({"logit_bias": {"1.5": 5}}, "logit_bias.1.5"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias.5"),
        ({"logit_bias": {"-1": 1}}, "logit_bias.-1"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ],
)
def test_refusals_name_the_callers_field(body: dict[str, Any], field: str) -> None:
    for parse in (chat, completion):
        err = refused(parse, **body)
        assert err.field_violations[0][0] == field, err.message
        assert err.message.startswith(f"{field}: ")


def test_response_format_with_grammar_names_both() -> None:
    err = refused(chat, response_format={"type": "json_object"}, grammar={"gbnf": 'root ::= "a"'})
    assert [f for f, _ in err.field_violations] == ["grammar", "response_format"]
    assert "response_format" in err.message


def test_logit_bias_range_refusal_says_the_range() -> None:
    err = refused(chat, logit_bias={"5": 200})
    assert err.message == "logit_bias.5: must be at most 100, got 200"
    err = refused(generate, **NATIVE_PROMPT, sampling={"logit_bias": {"-3": 1}})
    assert err.message == "sampling.logit_bias.-3: must be at least 0, got -3"


@pytest.mark.parametrize(
    ("constraint", "field"),
    [
        ({"json_schema": {}}, "constraint.json_schema.schema"),
        ({"gbnf": ""}, "constraint.gbnf"),
        ({"grammar": "yes-no"}, "constraint.grammar"),
    ],
)
def test_native_refusals_name_the_field(constraint: dict[str, Any], field: str) -> None:
    err = refused(generate, **NATIVE_PROMPT, constraint=constraint)
    assert err.field_violations[0][0] == field, err.message


def test_a_schema_outside_the_subset_names_the_keyword() -> None:
    # check_schema (services.inference.json_schema) decides the subset; the field path is ours.
    bad = {**SCHEMA, "properties": {"name": {"type": "strnig"}}}
    err = refused(chat, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": bad}})
    assert err.field_violations[0][0].startswith("response_format.json_schema.schema")
    err = refused(generate, **NATIVE_PROMPT, constraint={"json_schema": {"schema": bad}})
    assert err.field_violations[0][0].startswith("constraint.json_schema.schema")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"modalities": "text"}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"store": True}, "store"),
        ({"metadata": {"k": "v"}}, "metadata"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"verbosity": "low"}, "verbosity"),
        ({"prompt_cache_key": 5}, "prompt_cache_key"),
    ],
)
def test_openai_fields_ferry_cannot_honour_are_refused_by_name(body: dict[str, Any], field: str) -> None:
    err = refused(chat, **body)
    assert err.field_violations[0][0] == field, err.message


def test_functions_refusal_points_to_tools() -> None:
    assert "use tools" in refused(chat, functions=[{"name": "f"}]).message


@pytest.mark.parametrize(
    "body",
    [
        {"store": False},
        {"store": None},
        {"modalities": ["text"]},
        {"service_tier": "auto"},
        {"service_tier": "default"},
        {"metadata": {}},
        {"prompt_cache_key": "user-42-session"},
        {"safety_identifier": "hash-of-user"},
        {"functions": None, "audio": None, "reasoning_effort": None},
    ],
)
def test_no_op_values_and_hints_are_accepted(body: dict[str, Any]) -> None:
    assert chat(**body).sampling.constraint is None


@pytest.mark.parametrize(
    "body",
    [
        {"guided_json": {"type": "object"}},
        {"guided_regex": "[0-9]+"},
        {"guided_choice": ["yes", "no"]},
        {"guided_grammar": 'root ::= "a"'},
        {"structured_outputs": {"json": {"type": "object"}}},
    ],
)
def test_vllms_guided_fields_are_refused_not_dropped(body: dict[str, Any]) -> None:
    # A caller who sends them counts on a constrained answer: unconstrained text would be a silent lie.
    for parse in (chat, completion):
        err = refused(parse, **body)
        assert err.field_violations[0][0] == next(iter(body))
        assert "response_format" in err.message


def test_completions_still_refuse_suffix_and_best_of() -> None:
    assert refused(completion, suffix="end").field_violations[0][0] == "suffix"
    assert refused(completion, best_of=2).field_violations[0][0] == "best_of"


def answered(text: str, finish_reason: str) -> Outcome:
    return Outcome(text=[text], finish_reason=finish_reason)


def test_a_valid_json_answer_passes_the_check() -> None:
    check_answer(chat(response_format=JSON_SCHEMA), answered('{"name": "Ada", "age": 36}', "stop"))
    check_answer(chat(response_format={"type": "json_object"}), answered(' {"a": [1, 2]}', "stop"))


def test_an_answer_that_does_not_follow_its_schema_is_a_server_error() -> None:
    with pytest.raises(RpcError) as err:
        check_answer(chat(response_format=JSON_SCHEMA), answered('{"name": "Ada"}', "stop"))
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert "response_format" in err.value.message
    with pytest.raises(RpcError):
        check_answer(chat(response_format={"type": "json_object"}), answered("[1, 2]", "stop"))


def test_a_cut_short_answer_is_returned_as_it_is() -> None:
    check_answer(chat(response_format=JSON_SCHEMA), answered('{"name": "Ad', "length"))


def test_grammar_answers_are_the_engines_to_enforce() -> None:
    check_answer(chat(grammar={"gbnf": 'root ::= "yes"'}), answered("whatever", "stop"))


@pytest.mark.parametrize("parse", [chat, completion])
def test_stop_with_json_output_is_refused_naming_stop(parse: Any) -> None:
    # A stop sequence would cut the JSON the constraint promises.
    err = refused(parse, stop=["}"], response_format={"type": "json_object"})
    assert err.field_violations[0][0] == "stop"
    assert "response_format" in err.message


def test_stop_with_a_grammar_is_accepted() -> None:
    assert chat(stop=["."], grammar={"gbnf": 'root ::= "a" "."'}).sampling.stop == (".",)
