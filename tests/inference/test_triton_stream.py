"""Decoding Triton's streamed responses into pieces."""

from __future__ import annotations

import json

import numpy as np
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from services.inference.generation import Piece, TokenLogprob, TopLogprob
from services.inference.triton import decode

LOGPROBS = [{"token": " é", "logprob": -0.5, "top_logprobs": [{"token": " é", "logprob": -0.5}]}]


def _response(i: int, last: bool) -> service_pb2.ModelInferResponse:
    """One streamed piece encoded as Triton's Python backend sends it (raw output contents)."""
    response = service_pb2.ModelInferResponse(model_name="m", id=f"r{i}")
    outputs: list[tuple[str, str, np.ndarray]] = [
        ("text_output", "BYTES", np.array([f" é{i}".encode()], dtype=np.object_)),
        ("num_output_tokens", "INT32", np.array([1], dtype=np.int32)),
        ("num_input_tokens", "INT32", np.array([7], dtype=np.int32)),
        ("finish_reason", "BYTES", np.array([b"length" if last else b""], dtype=np.object_)),
        ("logprobs", "BYTES", np.array([json.dumps(LOGPROBS).encode()], dtype=np.object_)),
    ]
    for name, datatype, array in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
        response.raw_output_contents.append(raw)
    return response


def _piece(i: int, last: bool) -> Piece:
    logprobs = (TokenLogprob(" é", -0.5, (TopLogprob(" é", -0.5),)),)
    return Piece(f" é{i}", 1, 7, "length" if last else "", logprobs)


def test_decode_reads_every_output_of_a_piece() -> None:
    assert decode(InferResult(_response(3, last=True))) == _piece(3, last=True)
    assert decode(InferResult(_response(0, last=False))) == _piece(0, last=False)


def test_decode_of_text_sent_as_typed_contents() -> None:
    response = service_pb2.ModelInferResponse(model_name="m")
    text = response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b" hi")
    assert decode(InferResult(response)) == Piece(" hi", 0, 0, "", ())
