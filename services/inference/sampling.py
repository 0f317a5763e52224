"""The caller's sampling values -> the engine contract's `SamplingParameters`, validated by the contract.

The limits live in the contract only (`backends.llamacpp.contract`); a value it refuses becomes
INVALID_ARGUMENT naming the field as the caller spelled it, with the range read from the contract's
own constraints so the message says what would be accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import annotated_types
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from backends.llamacpp.contract import SamplingParameters
from services.common.errors import RpcError, invalid_argument
from services.inference.domain import FieldSpelling

_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def sampling_parameters(values: Mapping[str, Any], spelling: FieldSpelling) -> SamplingParameters:
    """Builds the contract's parameters from the values the caller set (None = not set)."""
    try:
        return SamplingParameters(**{name: value for name, value in values.items() if value is not None})
    except ValidationError as err:
        raise refusal(err, spelling) from err


def refusal(err: ValidationError, spelling: FieldSpelling) -> RpcError:
    """INVALID_ARGUMENT with one field violation per contract error, in the caller's spelling; the
    message names the first."""
    violations = [(spelling.location(e["loc"]), describe(e)) for e in err.errors()]
    rpc = invalid_argument(*violations[0])
    rpc.field_violations.extend(violations[1:])
    return rpc


def describe(error: ErrorDetails) -> str:
    """What was wrong with a value, in words a caller can act on."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _RANGE_ERRORS and len(error["loc"]) == 1:
        return f"must be {_range(str(error['loc'][0]))}, got {_number(error['input'])}"
    if kind in _RANGE_ERRORS:
        # A value inside a field (a logit_bias entry): the bound is in the error itself.
        return f"must be {_bound(kind, ctx)}, got {_number(error['input'])}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "too_long":
        got = ctx.get("actual_length")
        return f"at most {ctx.get('max_length')} values are allowed" + (f", got {got}" if got else "")
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return str(error["msg"])


def _range(field: str) -> str:
    """The accepted range of a contract field, from its constraints: `in [0, 2]`, `at least 1`."""
    low = high = ""
    for constraint in SamplingParameters.model_fields[field].metadata:
        if isinstance(constraint, annotated_types.Ge):
            low = f"[{_number(constraint.ge)}"
        elif isinstance(constraint, annotated_types.Gt):
            low = f"({_number(constraint.gt)}"
        elif isinstance(constraint, annotated_types.Le):
            high = f"{_number(constraint.le)}]"
        elif isinstance(constraint, annotated_types.Lt):
            high = f"{_number(constraint.lt)})"
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"at least {low[1:]}" if low.startswith("[") else f"greater than {low[1:]}"
    return f"at most {high[:-1]}" if high.endswith("]") else f"less than {high[:-1]}"


def _bound(kind: str, ctx: Mapping[str, Any]) -> str:
    words = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
    }
    word, key = words[kind]
    return f"{word} {_number(ctx.get(key))}"


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# Sampling fields every API spells as the contract does (OpenAI at the top level of a request, the
# native API under `sampling`), all proto3 `optional`.
SAME_NAMED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


def same_named(message: Any, names: tuple[str, ...] = SAME_NAMED) -> dict[str, Any]:
    """The `optional` fields `names` of a request message, None where the caller did not set them."""
    return {name: getattr(message, name) if message.HasField(name) else None for name in names}
