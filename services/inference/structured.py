"""Structured output on every API: what the caller asked the output to follow, as the engine contract
takes it, and the check that a constrained answer follows it.

- OpenAI's `response_format` (chat, and completions as in vLLM), ferry's `grammar` extension and the
  native `constraint` become one `Constraint`: the contract's `OutputConstraint`, or the name of a
  stored grammar that a later pipeline stage resolves. Each remembers the caller's field, so an engine
  refusal ("constraint" in the contract) names `response_format`, `grammar.gbnf` or `constraint.lark`.
- `logit_bias` (OpenAI: token-id strings; native: integers) becomes token id -> bias; the contract
  checks ids and ranges.
- `check_answer`: a JSON constraint that finished with "stop" must parse and validate (the engine
  enforces it while sampling; this makes "always" a checked promise rather than a hope).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import json_format, struct_pb2

from backends.llamacpp.contract import ConstraintKind, OutputConstraint
from services.common.errors import Reason, invalid_argument, rpc_error
from services.common.names import resource_id
from services.inference.domain import GenerationRequest, Outcome
from services.inference.json_schema import check_schema, validate_instance

# What ferry adds to a caller's schema for the engine, each because small models otherwise write until
# max_tokens (seen on gemma-3-270m and smollm2-135m-instruct at temperature 0):
# - llguidance's options (a keyword validators ignore): it allows any whitespace between JSON tokens by
#   default, and a model writes newlines instead of the next key. A caller's own `x-guidance` wins.
ENGINE_OPTIONS = "x-guidance"
COMPACT_JSON: dict[str, Any] = {ENGINE_OPTIONS: {"whitespace_flexible": False}}
# - a bound on the decimals of a `number` that has no `multipleOf`: llguidance allows any number of
#   digits, and a model writes `0.8000000000…` (llama.cpp's own schema converter allows 16). The answer
#   is validated against the caller's schema, without it (a validator's float `multipleOf` is inexact).
ENGINE_DECIMALS = 1e-8
# - `"additionalProperties": false` on an object with `properties` that does not say (as vLLM's
#   xgrammar does by default): JSON Schema allows any other property, and a model then invents keys until
#   max_tokens. Answers are still valid for the caller's schema (they merely have no extra keys).
_EXTRA_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
# Keywords whose values are data, not schemas: not looked into.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
# OpenAI's rule for `response_format.json_schema.name`.
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SCHEMA_NAME_RULE = "1-64 characters of a-z, A-Z, 0-9, _ and -"
GRAMMARS = "grammars"
# The grammar registry owns the id rule; here only the form `grammars/{id}` is checked.
_ANY_ID = re.compile(r"^[^/]+$")
# An OpenAI logit_bias key: a token id written in decimal.
_TOKEN_ID = re.compile(r"^-?[0-9]{1,10}$")


@dataclass(frozen=True)
class Constraint:
    """The output constraint a request asked for: the contract's, or a stored grammar to resolve."""

    output: OutputConstraint | None = None
    # `grammars/{id}`, resolved into `output` by the grammar stage before the engine.
    grammar_name: str = ""
    # The caller's field that asked for it (`response_format`, `grammar.gbnf`, `constraint.json_schema`).
    field: str = ""

    @property
    def renamed(self) -> dict[str, str]:
        """FieldSpelling renames: engine and grammar-stage errors name the caller's field."""
        return {"constraint": self.field, "grammar_name": self.field} if self.field else {}


FREE = Constraint()


def json_value(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values; integral numbers become ints again (a Struct holds doubles, and
    `"maxItems": 3.0` is not what the caller wrote)."""
    return _ints(json_format.MessageToDict(struct))  # type: ignore[no-any-return]


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_ints(item) for item in value]
    return value


def _json_schema(schema: struct_pb2.Struct, field: str) -> OutputConstraint:
    """A JSON Schema constraint, the schema checked against ferry's subset first (llama.cpp would
    silently run unconstrained on a schema it cannot compile), and compact unless the caller said."""
    value = json_value(schema)
    check_schema(value, field)
    return OutputConstraint(kind=ConstraintKind.JSON_SCHEMA, json_schema=engine_schema(value))


def engine_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The caller's (checked) schema as the engine is given it: compact, decimals bounded, no
    properties beyond the named ones unless the schema says."""
    return {**COMPACT_JSON, **_for_engine(schema, engine=True)}


def answer_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An engine schema without ferry's engine options and decimal bounds: what answers are validated
    against, and what servers other than llguidance are sent. (A caller's own `multipleOf` of
    ENGINE_DECIMALS goes too: the engine enforced it. The added `additionalProperties: false` stays:
    the engine enforced that, and OpenAI's strict mode asks for it.)"""
    plain = {key: value for key, value in schema.items() if key != ENGINE_OPTIONS}
    return _for_engine(plain, engine=False)  # type: ignore[no-any-return]


def _for_engine(value: Any, *, engine: bool) -> Any:
    """Every subschema with ferry's engine additions (engine=True) or without its decimal bound."""
    if isinstance(value, list):
        return [_for_engine(item, engine=engine) for item in value]
    if not isinstance(value, dict):
        return value
    out = {
        key: item if key in _DATA_KEYWORDS else _for_engine(item, engine=engine)
        for key, item in value.items()
    }
    kind = out.get("type")
    is_number = kind == "number" or (isinstance(kind, list) and "number" in kind)
    if engine and is_number and "multipleOf" not in out:
        out["multipleOf"] = ENGINE_DECIMALS
    if engine and isinstance(out.get("properties"), dict) and not any(k in out for k in _EXTRA_KEYWORDS):
        out["additionalProperties"] = False
    if not engine and is_number and out.get("multipleOf") == ENGINE_DECIMALS:
        del out["multipleOf"]
    return out


def _grammar(kind: ConstraintKind, text: str, field: str) -> Constraint:
    if not text.strip():
        raise invalid_argument(field, "must not be empty")
    try:
        return Constraint(OutputConstraint(kind=kind, grammar=text), field=field)
    except ValueError as err:  # pydantic's ValidationError: over the contract's size limit
        raise invalid_argument(field, f"is too long: {len(text.encode())} bytes") from err


def _stored(name: str, field: str) -> Constraint:
    resource_id(name, GRAMMARS, _ANY_ID, field)
    return Constraint(grammar_name=name, field=field)


def response_format(message: openai_pb2.ResponseFormat) -> Constraint:
    """OpenAI's `response_format`: `text` (free), `json_object`, or `json_schema` with a name and a
    schema (`strict` is accepted: ferry always enforces the schema)."""
    kind = message.type
    has_schema = message.HasField("json_schema")
    if kind == "text" or kind == "json_object":
        if has_schema:
            raise invalid_argument(
                "response_format.json_schema", f"is only allowed with type 'json_schema', not '{kind}'"
            )
        if kind == "text":
            return FREE
        return Constraint(OutputConstraint(kind=ConstraintKind.JSON_OBJECT), field="response_format")
    if kind != "json_schema":
        what = f"got '{kind}'" if kind else "it is required"
        raise invalid_argument(
            "response_format.type", f"must be 'text', 'json_object' or 'json_schema'; {what}"
        )
    if not has_schema:
        raise invalid_argument("response_format.json_schema", "is required with type 'json_schema'")
    spec = message.json_schema
    if not spec.name:
        raise invalid_argument("response_format.json_schema.name", "is required")
    if not SCHEMA_NAME.match(spec.name):
        raise invalid_argument("response_format.json_schema.name", f"must be {SCHEMA_NAME_RULE}")
    if not spec.HasField("schema"):
        raise invalid_argument("response_format.json_schema.schema", "is required")
    output = _json_schema(spec.schema, "response_format.json_schema.schema")
    return Constraint(output, field="response_format")


def openai_grammar(message: openai_pb2.Grammar) -> Constraint:
    """ferry's `grammar` extension: `{"gbnf": ...}`, `{"lark": ...}` or `{"name": "grammars/{id}"}`."""
    which = message.WhichOneof("definition")
    if which == "gbnf":
        return _grammar(ConstraintKind.GBNF, message.gbnf, "grammar.gbnf")
    if which == "lark":
        return _grammar(ConstraintKind.LARK, message.lark, "grammar.lark")
    if which == "name":
        return _stored(message.name, "grammar.name")
    raise invalid_argument("grammar", "must hold one of gbnf, lark or name")


def openai_constraint(request: Any) -> Constraint:
    """`response_format` and `grammar` of a CreateChatCompletionRequest or CreateCompletionRequest;
    both constrain the output, so at most one may."""
    formatted = response_format(request.response_format) if request.HasField("response_format") else FREE
    grammar = openai_grammar(request.grammar) if request.HasField("grammar") else FREE
    if formatted.field and grammar.field:
        err = invalid_argument(
            "grammar", "cannot be combined with response_format (both constrain the output): send one"
        )
        err.field_violations.append(("response_format", "cannot be combined with grammar"))
        raise err
    return formatted if formatted.field else grammar


def native_constraint(message: inference_pb2.OutputConstraint) -> Constraint:
    """The native `constraint` oneof."""
    which = message.WhichOneof("kind")
    if which is None:
        return FREE
    if which == "json_object":
        return Constraint(OutputConstraint(kind=ConstraintKind.JSON_OBJECT), field="constraint.json_object")
    if which == "json_schema":
        if not message.json_schema.HasField("schema"):
            raise invalid_argument("constraint.json_schema.schema", "is required")
        output = _json_schema(message.json_schema.schema, "constraint.json_schema.schema")
        return Constraint(output, field="constraint.json_schema")
    if which == "gbnf":
        return _grammar(ConstraintKind.GBNF, message.gbnf, "constraint.gbnf")
    if which == "lark":
        return _grammar(ConstraintKind.LARK, message.lark, "constraint.lark")
    return _stored(message.grammar, "constraint.grammar")


def openai_logit_bias(bias: Mapping[str, float]) -> dict[int, float] | None:
    """OpenAI's `logit_bias` ({"token id": bias}); None when empty. Ranges are the contract's."""
    ids: dict[int, float] = {}
    for key, value in bias.items():
        if not _TOKEN_ID.match(key):
            raise invalid_argument(
                f"logit_bias.{key}", "keys must be token ids (integers written as strings)"
            )
        ids[int(key)] = value
    return ids or None


def native_logit_bias(bias: Mapping[int, float]) -> dict[int, float] | None:
    return dict(bias) or None


def follows(text: str, constraint: OutputConstraint) -> str | None:
    """None when `text` follows a JSON constraint (grammars are the engine's alone); else why not."""
    if constraint.kind is ConstraintKind.JSON_OBJECT:
        return validate_instance(text, None)
    if constraint.kind is ConstraintKind.JSON_SCHEMA and constraint.json_schema is not None:
        return validate_instance(text, answer_schema(constraint.json_schema))
    return None


def check_answer(request: GenerationRequest, outcome: Outcome) -> None:
    """A constrained answer that finished with "stop" follows its constraint, or the request fails with
    a server error (never invalid JSON as if it were fine). A "length" answer is cut short: OpenAI
    returns it as it is, and so does ferry."""
    constraint = request.sampling.constraint
    if constraint is None or outcome.finish_reason != "stop":
        return
    why = follows("".join(outcome.text), constraint)
    if why is not None:
        field = request.spelling.field("constraint")
        raise rpc_error(Reason.ENGINE_ERROR, f"engine error: the answer does not follow {field}: {why}")
