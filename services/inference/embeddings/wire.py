"""OpenAI's CreateEmbeddingRequest and the native EmbedRequest on the wire -> an `EmbeddingRequest`.

Every refusal is INVALID_ARGUMENT naming the field as the caller spelled it (`input[3]`, `inputs[3]`).
What only the model can say (too many tokens, the model's dimensions, its capability) is checked later.
"""

from __future__ import annotations

from collections.abc import Sequence

from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2

from services.common.config import EmbeddingSettings
from services.common.errors import invalid_argument
from services.common.names import model_id_from_name
from services.inference.embeddings.request import EmbeddingRequest, EncodingFormat
from services.inference.openai_api import fields

TOKEN_IDS_REFUSED = (
    "token-id input is not supported: send text (ferry tokenises it with the model's own tokenizer)"
)


def _is_token_id(value: struct_pb2.Value) -> bool:
    return value.WhichOneof("kind") == "number_value" and float(value.number_value).is_integer()


def _is_token_list(value: struct_pb2.Value) -> bool:
    items = value.list_value.values if value.WhichOneof("kind") == "list_value" else ()
    return bool(items) and all(_is_token_id(item) for item in items)


def openai_inputs(value: struct_pb2.Value | None) -> tuple[tuple[str, ...], bool]:
    """`input`: a string or a list of strings -> (texts, whether a single string was sent). Token ids
    ([int] or [[int]]) are refused naming `input`."""
    kind = value.WhichOneof("kind") if value is not None else None
    if value is None or kind in (None, "null_value"):
        raise invalid_argument("input", "is required: a string or a list of strings")
    if kind == "string_value":
        return (value.string_value,), True
    if kind != "list_value":
        raise invalid_argument("input", "must be a string or a list of strings")
    items = value.list_value.values
    if not items:
        raise invalid_argument("input", "must not be an empty list")
    if all(_is_token_id(item) for item in items) or all(_is_token_list(item) for item in items):
        raise invalid_argument("input", TOKEN_IDS_REFUSED)
    texts = []
    for i, item in enumerate(items):
        if item.WhichOneof("kind") != "string_value":
            raise invalid_argument(f"input[{i}]", "must be a string (token-id input is not supported)")
        texts.append(item.string_value)
    return tuple(texts), False


def check_inputs(texts: Sequence[str], field: str, single: bool, limits: EmbeddingSettings) -> None:
    """At least one input, none empty, at most `max_inputs` of them and `max_input_bytes` together."""
    if len(texts) > limits.max_inputs:
        raise invalid_argument(field, f"at most {limits.max_inputs} inputs per request, got {len(texts)}")
    total = 0
    for i, text in enumerate(texts):
        if not text:
            raise invalid_argument(field if single else f"{field}[{i}]", "must not be empty")
        total += len(text.encode("utf-8"))
    if total > limits.max_input_bytes:
        raise invalid_argument(
            field,
            f"the inputs total {total} bytes of UTF-8, more than the {limits.max_input_bytes} allowed per request;"
            " split them over several requests",
        )


def encoding_format(value: str) -> EncodingFormat:
    if not value:
        return EncodingFormat.FLOAT
    try:
        return EncodingFormat(value)
    except ValueError:
        raise invalid_argument("encoding_format", f"must be 'float' or 'base64', got {value!r}") from None


def parse_openai(request: openai_pb2.CreateEmbeddingRequest, limits: EmbeddingSettings) -> EmbeddingRequest:
    model = fields.model_name(request.model)
    texts, single = openai_inputs(request.input if request.HasField("input") else None)
    check_inputs(texts, "input", single, limits)
    dimensions = request.dimensions if request.HasField("dimensions") else None
    if dimensions is not None and dimensions < 1:
        raise invalid_argument("dimensions", f"must be a positive integer, got {dimensions}")
    return EmbeddingRequest(
        model=model,
        inputs=texts,
        input_field="input",
        single=single,
        encoding_format=encoding_format(request.encoding_format),
        dimensions=dimensions,
        user=request.user,
    )


def parse_native(request: inference_pb2.EmbedRequest, limits: EmbeddingSettings) -> EmbeddingRequest:
    # `models/{model}` (AIP-122); a bare id is accepted too, as for Generate.
    model = model_id_from_name(request.model, "model", bare_id=True)
    if not request.inputs:
        raise invalid_argument("inputs", "at least one text is required")
    texts = tuple(request.inputs)
    check_inputs(texts, "inputs", False, limits)
    return EmbeddingRequest(model=model, inputs=texts, input_field="inputs", truncate=request.truncate)
