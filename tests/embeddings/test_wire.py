"""Parsing embeddings requests (no stack): what each API accepts and how a refusal names the field."""

from __future__ import annotations

import pytest
from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import json_format

from services.common.config import EmbeddingSettings
from services.common.errors import RpcError
from services.inference.embeddings.request import EncodingFormat
from services.inference.embeddings.wire import parse_native, parse_openai

LIMITS = EmbeddingSettings(max_inputs=3, max_input_bytes=10)


def openai(body: dict[str, object]) -> openai_pb2.CreateEmbeddingRequest:
    return json_format.ParseDict({"model": "m", **body}, openai_pb2.CreateEmbeddingRequest())


def test_a_string_and_a_list_of_strings_are_inputs() -> None:
    single = parse_openai(openai({"input": "hi"}), LIMITS)
    assert (single.inputs, single.field(0), single.encoding_format) == (
        ("hi",),
        "input",
        EncodingFormat.FLOAT,
    )
    many = parse_openai(openai({"input": ["a", "b"], "encoding_format": "base64"}), LIMITS)
    assert (many.inputs, many.field(1), many.encoding_format) == (
        ("a", "b"),
        "input[1]",
        EncodingFormat.BASE64,
    )
    native = parse_native(inference_pb2.EmbedRequest(model="models/m", inputs=["a"], truncate=True), LIMITS)
    assert (native.model, native.truncate, native.field(0)) == ("m", True, "inputs[0]")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": ["a", "b", "c", "d"]}, "input"),  # more than max_inputs
        ({"input": ["12345", "123456"]}, "input"),  # more than max_input_bytes together
        ({"input": [1, 2]}, "input"),
        ({"input": {"text": "a"}}, "input"),
        ({"input": ["a", ""]}, "input[1]"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "", "input": "a"}, "model"),
    ],
)
def test_refusals_name_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(RpcError) as refused:
        parse_openai(openai(body), LIMITS)
    assert refused.value.message.startswith(f"{field}: ")
