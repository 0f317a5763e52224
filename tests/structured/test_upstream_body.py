"""What an upstream (OpenAI-compatible) model is sent for structured output: logit_bias and a JSON
constraint pass through as OpenAI's fields on chat; what OpenAI's API has no field for is refused with
a 400 naming the caller's field and the model, never sent where it would be ignored."""

from __future__ import annotations

import grpc
import pytest

from backends.llamacpp.contract import ConstraintKind, OutputConstraint, SamplingParameters
from services.inference.domain import FieldSpelling
from services.inference.engine_errors import caller_error
from services.inference.engine_interface import EngineFaulted
from services.inference.upstream_engine import request_body
from tests.inference.test_upstream_engine import HI, info

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def test_logit_bias_and_a_json_schema_pass_through_on_chat() -> None:
    sampling = SamplingParameters(
        logit_bias={42: -100.0},
        constraint=OutputConstraint(
            kind=ConstraintKind.JSON_SCHEMA,
            json_schema={**SCHEMA, "x-guidance": {"whitespace_flexible": False}},
        ),
    )
    body = request_body(info(), "their-model", sampling, "", HI)
    assert body["logit_bias"] == {"42": -100.0}
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": SCHEMA, "strict": True},
    }


def test_json_object_passes_through_on_chat() -> None:
    sampling = SamplingParameters(constraint=OutputConstraint(kind=ConstraintKind.JSON_OBJECT))
    assert request_body(info(), "m", sampling, "", HI)["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    ("constraint", "chat", "field"),
    [
        (OutputConstraint(kind=ConstraintKind.GBNF, grammar='root ::= "a"'), True, "grammar.gbnf"),
        (OutputConstraint(kind=ConstraintKind.LARK, grammar='start: "a"'), True, "grammar.lark"),
        (OutputConstraint(kind=ConstraintKind.JSON_OBJECT), False, "response_format"),
    ],
)
def test_what_openai_has_no_field_for_is_refused(
    constraint: OutputConstraint, chat: bool, field: str
) -> None:
    with pytest.raises(EngineFaulted) as err:
        request_body(info(), "m", SamplingParameters(constraint=constraint), "Once", HI if chat else None)
    rpc = caller_error(err.value, FieldSpelling(input="messages", renamed={"constraint": field}))
    assert rpc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.field_violations[0][0] == field
    assert "upstream" in rpc.message and "'" + info().name + "'" in rpc.message
