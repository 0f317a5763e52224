"""JSON Schemas of structured output and tool parameters: checked before generation, and answers
checked after it.

ferry refuses a schema it cannot enforce instead of generating unconstrained (which is what llama.cpp
does with a schema it fails to compile). A schema is accepted when
1. it is a valid JSON Schema (Draft 2020-12, the dialect Pydantic and the OpenAI SDK write), and
2. llguidance, the engine's constraint compiler, compiles it: the supported subset is llguidance's
   (type, properties, required, additionalProperties, items, prefixItems, minItems/maxItems, enum,
   const, anyOf/oneOf, allOf, $ref/$defs, minimum/maximum and their exclusive forms, minLength/
   maxLength, pattern, format for date-time/date/time/email/uuid and a few more; annotations such as
   title, description, default and examples are ignored). Keywords it cannot enforce, such as `not`,
   `if`/`then`/`else` or `uniqueItems`, are refused with their name.
A refusal is INVALID_ARGUMENT naming the request field, and within the schema the keyword's path.
"""

from __future__ import annotations

import json
from fractions import Fraction
from functools import lru_cache
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from backends.llamacpp.constraints import constraint_problem
from backends.llamacpp.contract import MAX_CONSTRAINT_BYTES, ConstraintKind, OutputConstraint
from services.common.errors import invalid_argument


def _multiple_of(validator: Any, divisor: Any, instance: Any, schema: Any) -> Any:
    """`multipleOf` in exact decimal arithmetic: jsonschema's float division says 0.8 is not a
    multiple of 0.000001, which would turn a good answer into an error."""
    if not validator.is_type(instance, "number"):
        return
    quotient = Fraction(str(instance)) / Fraction(str(divisor))
    if quotient.denominator != 1:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {divisor!r}")


_VALIDATOR = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"multipleOf": _multiple_of})


def check_schema(schema: Any, field: str) -> None:
    """Raise INVALID_ARGUMENT naming `field` (and the keyword's path in the schema) unless the engine
    can enforce `schema`."""
    if not isinstance(schema, dict):
        raise invalid_argument(field, "must be a JSON Schema object")
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > MAX_CONSTRAINT_BYTES:
        raise invalid_argument(field, f"is larger than {MAX_CONSTRAINT_BYTES} bytes")
    problem = _problem(text)
    if problem is not None:
        where, description = problem
        raise invalid_argument(f"{field}{where}", description)


@lru_cache(maxsize=256)
def _problem(text: str) -> tuple[str, str] | None:
    """(path inside the schema, what is wrong) or None; cached by the schema's canonical text, since
    clients send the same few schemas again and again."""
    schema = json.loads(text)
    try:
        _VALIDATOR.check_schema(schema)
    except jsonschema.SchemaError as err:
        return _path(err.path), f"is not a valid JSON Schema: {err.message}"
    engine = constraint_problem(OutputConstraint(kind=ConstraintKind.JSON_SCHEMA, json_schema=schema))
    if engine is not None:
        return "", f"uses what ferry cannot enforce: {engine}"
    return None


def _path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def validate_instance(text: str, schema: dict[str, Any] | None) -> str | None:
    """None when `text` is JSON (an object when `schema` is None) valid against `schema`; else why not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return f"the answer is not JSON: {err}"
    if schema is None:
        return None if isinstance(value, dict) else "the answer is not a JSON object"
    error = best_match(_VALIDATOR(schema).iter_errors(value))
    if error is None:
        return None
    return f"the answer does not follow the schema at '{error.json_path}': {error.message}"
