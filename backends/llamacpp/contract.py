"""The typed contract between ferry's inference service and the llama.cpp Triton backend.

Imported on both sides (inside Triton's Python stub and by the inference service), so it needs only the
standard library and pydantic. It defines, once: the sampling parameters a generation request carries
(the `sampling_parameters` input tensor) with their limits, and every error the backend can send
(`EngineFault`, carried as JSON in the TritonError message, with a matching Triton error code).
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

MAX_STOP_SEQUENCES = 4  # OpenAI's limit; one number for both sides
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024
# A grammar's text (GBNF or Lark) or a JSON Schema's JSON, at most (bytes of UTF-8).
MAX_CONSTRAINT_BYTES = 256 * 1024
# An optional BOOL input tensor: when true, the request only counts the prompt's tokens with the model's
# own tokenizer (special tokens parsed, BOS added, as for generation). The one final response carries
# the count in `num_input_tokens`, an empty `text_output` and `finish_reason`; nothing is generated.
COUNT_TOKENS_INPUT = "count_tokens"
# How llama.cpp tells an llguidance grammar (Lark, or JSON Schema through `%json`) from GBNF.
LLGUIDANCE_HEADER = "%llguidance {}"
INT64_MIN = -(1 << 63)
UINT64_MAX = (1 << 64) - 1


def _integer_input(value: Any) -> Any:
    """Refuse JSON true/false and numeric strings for integer fields; 3.0 stays acceptable as 3."""
    if isinstance(value, bool | str | bytes):
        raise ValueError("must be an integer")
    return value


# A JSON number (an integer is fine, true and "0.5" are not), finite.
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]
# A JSON integer; 1.5 is refused by pydantic's int, true and "3" by the check before it.
Integer = Annotated[int, BeforeValidator(_integer_input)]
StopSequence = Annotated[StrictStr, Field(min_length=1)]


class ConstraintKind(StrEnum):
    """What the generated text must follow."""

    # Any JSON object.
    JSON_OBJECT = "json_object"
    # JSON valid against `json_schema` (the service checks the schema first: docs/structured-output.md).
    JSON_SCHEMA = "json_schema"
    # A GBNF grammar (llama.cpp's syntax) in `grammar`.
    GBNF = "gbnf"
    # A Lark grammar (llguidance's syntax) in `grammar`.
    LARK = "lark"


class OutputConstraint(BaseModel):
    """A constraint on the output, enforced by the engine while it samples. A constraint the engine
    cannot compile is INVALID_PARAMETER with field "constraint": the engine never generates
    unconstrained instead."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ConstraintKind
    json_schema: dict[str, Any] | None = None
    grammar: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_CONSTRAINT_BYTES)

    @field_validator("grammar")
    @classmethod
    def _grammar_goes_with_its_kind(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind in (ConstraintKind.GBNF, ConstraintKind.LARK) and value is None:
            raise ValueError(f"a {kind} constraint needs its grammar")
        if kind not in (ConstraintKind.GBNF, ConstraintKind.LARK) and value is not None:
            raise ValueError(f"a {kind} constraint takes no grammar")
        return value

    def model_post_init(self, context: Any) -> None:
        if (self.kind is ConstraintKind.JSON_SCHEMA) != (self.json_schema is not None):
            raise ValueError("json_schema goes with kind json_schema, and only with it")

    @property
    def is_json(self) -> bool:
        """The answer is JSON (an object, or one following `json_schema`), which a caller can check."""
        return self.kind in (ConstraintKind.JSON_OBJECT, ConstraintKind.JSON_SCHEMA)

    def engine_grammar(self) -> str:
        """The grammar llama.cpp is given: GBNF as it is; everything else as an llguidance grammar
        (a JSON Schema as llguidance's `%json`, which is what xllamacpp.json_schema_to_grammar writes).
        llama.cpp's `json_schema` field is not used: a schema it cannot compile silently runs
        unconstrained there, while a grammar is checked first (backends/llamacpp/constraints.py)."""
        if self.kind is ConstraintKind.GBNF:
            return self.grammar or ""
        if self.kind is ConstraintKind.LARK:
            return f"{LLGUIDANCE_HEADER}\n{self.grammar}"
        schema = self.json_schema if self.kind is ConstraintKind.JSON_SCHEMA else {"type": "object"}
        return f"{LLGUIDANCE_HEADER}\nstart: %json {json.dumps(schema, separators=(',', ':'))}"


class SamplingParameters(BaseModel):
    """What one generation request asks of the engine; the limits are defined here only.

    The service validates callers with it and serialises it with `to_json()` into the
    `sampling_parameters` tensor; the backend validates that tensor with `from_json()`. A field the
    tensor leaves out means the model's default (its `default_sampling_parameters`, else llama.cpp's);
    a field it holds wins over that default, even `false`, `[]` or `0`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_k: Integer | None = Field(default=None, ge=-1)  # -1 and 0 = disabled
    min_p: Number | None = Field(default=None, ge=0, le=1)
    # Upper bound = the model's max_tokens (checked by the service's policy and by the backend).
    max_tokens: Integer | None = Field(default=None, ge=1)
    stop: tuple[StopSequence, ...] = Field(default=(), max_length=MAX_STOP_SEQUENCES)
    seed: Integer | None = Field(default=None, ge=INT64_MIN, le=UINT64_MAX)  # any int64 or uint64
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: Number | None = Field(default=None, gt=0, le=2)
    logprobs: StrictBool = False
    top_logprobs: Integer = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    ignore_eos: StrictBool = False
    # The caller's (API key's) prompt-length limit; a longer prompt is PROMPT_TOO_LONG with limit="caller".
    max_prompt_tokens: Integer | None = Field(default=None, ge=1)
    # OpenAI's logit_bias: token id -> bias added to its logit, -100 (never) to 100 (always). A token id
    # outside the model's vocabulary is INVALID_PARAMETER (field "logit_bias").
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[Number, Field(ge=-100, le=100)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS_ENTRIES
    )
    # Constrained output (JSON, a JSON Schema, a grammar); None: free text.
    constraint: OutputConstraint | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int, info: ValidationInfo) -> int:
        # logprobs is declared (so validated) before top_logprobs; the error's loc is ("top_logprobs",).
        if value > 0 and not info.data.get("logprobs", False):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    def to_json(self) -> str:
        """Compact JSON of the fields that were set (the `sampling_parameters` tensor): an explicit `false`
        or `[]` stays, so it still overrides the model's default in the backend."""
        return self.model_dump_json(exclude_unset=True)

    @classmethod
    def from_json(cls, text: str) -> SamplingParameters:
        """Parse and validate the `sampling_parameters` tensor; "" (or only whitespace) means defaults.

        Raises pydantic.ValidationError; each error's `loc` is (field,) or ("stop", index), or () when
        the text is not a JSON object at all.
        """
        if not text.strip():
            return cls()
        return cls.model_validate_json(text)


class EngineErrorCode(StrEnum):
    """Every kind of error the backend sends."""

    # A sampling parameter the engine refuses; `field` names it (contract field name). Also a bad input
    # tensor (`field` = the tensor's name).
    INVALID_PARAMETER = "INVALID_PARAMETER"
    # The prompt does not fit: prompt_tokens, context_length and limit ("model" or "caller") are set.
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    # The model is stopping or unloading (Triton shutting down, or an unload): retryable,
    # retry_after_seconds is set.
    MODEL_UNLOADING = "MODEL_UNLOADING"
    # Anything else the engine reports.
    ENGINE_FAILED = "ENGINE_FAILED"

    @property
    def triton_code(self) -> str:
        """The name of the pb_utils.TritonError code the backend sends with this fault."""
        return _TRITON_CODES[self]


_TRITON_CODES = {
    EngineErrorCode.INVALID_PARAMETER: "INVALID_ARG",
    EngineErrorCode.PROMPT_TOO_LONG: "INVALID_ARG",
    EngineErrorCode.MODEL_UNLOADING: "UNAVAILABLE",
    EngineErrorCode.ENGINE_FAILED: "INTERNAL",
}


class EngineFault(BaseModel):
    """One error from the backend, sent as the JSON text of a TritonError."""

    model_config = ConfigDict(frozen=True)

    code: EngineErrorCode
    message: str
    field: str | None = None
    prompt_tokens: int | None = None
    context_length: int | None = None
    limit: Literal["model", "caller"] | None = None
    retry_after_seconds: float | None = None

    def to_message(self) -> str:
        """The TritonError message text the backend sends (compact JSON, unset fields left out)."""
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_message(cls, text: str) -> EngineFault | None:
        """The fault in a Triton error message, or None when it is not one of this contract's faults
        (Triton's own errors, such as an unknown model)."""
        text = text.strip()
        if not text.startswith("{"):
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(data, dict) or "code" not in data:
            return None
        try:
            return cls.model_validate(data)
        except ValidationError:
            return None
