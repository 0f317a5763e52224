"""The engine on Triton, as Triton sees it: a finished generation ends the stream normally (half-close,
then OK), an abandoned one cancels it (that is how the model learns to free its engine slot).

Triton is stood in for by an in-process gRPC server speaking its `ModelStreamInfer` protocol, since
the real one cannot tell a test whether a stream was cancelled or closed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import serialize_byte_tensor

from backends.llamacpp.contract import EngineErrorCode, EngineFault, SamplingParameters
from services.common.triton_client import ModelInfo, infer_request, string_input
from services.inference.domain import Piece, TokenLogprob, TopLogprob
from services.inference.engine_interface import EngineFaulted
from services.inference.triton_engine import TritonEngine, decode

MODEL = ModelInfo("m", "python", 4096, 1024, "ferry", "", 1)

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


class DecoupledModel(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Streams `pieces` responses per request, then waits for the client to half-close, as Triton does."""

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces
        # Sent instead of the last piece when set (an error response, as Triton streams them).
        self.error_message = ""
        self.sampling_parameters: list[str] = []
        # Per stream: True if the client cancelled it, False if it ended normally.
        self.cancelled: asyncio.Queue[bool] = asyncio.Queue()

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[service_pb2.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        ended = False
        try:
            async for request in request_iterator:
                sampling = next(i for i, t in enumerate(request.inputs) if t.name == "sampling_parameters")
                self.sampling_parameters.append(request.raw_input_contents[sampling][4:].decode())
                for i in range(self.pieces):
                    last = i == self.pieces - 1
                    if last and self.error_message:
                        yield service_pb2.ModelStreamInferResponse(error_message=self.error_message)
                        continue
                    yield service_pb2.ModelStreamInferResponse(infer_response=_response(i, last))
            # The request stream also ends when the client cancels; a cancellation then still
            # reaches the handler as CancelledError while it takes its time to close the stream.
            await asyncio.sleep(0.1)
            ended = True
        finally:
            self.cancelled.put_nowait(not ended)


@pytest.fixture
async def triton() -> AsyncIterator[tuple[DecoupledModel, TritonEngine]]:
    model = DecoupledModel(pieces=4)
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(model, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        yield model, TritonEngine(client)
    finally:
        await client.close()
        await server.stop(None)


def test_decode_reads_every_output_of_a_piece() -> None:
    assert decode(_response(3, last=True)) == _piece(3, last=True)
    assert decode(_response(0, last=False)) == _piece(0, last=False)


def test_decode_of_text_sent_as_typed_contents() -> None:
    response = service_pb2.ModelInferResponse(model_name="m")
    text = response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b" hi")
    assert decode(response) == Piece(" hi", 0, 0, "", ())


def test_the_request_is_the_one_tritonclient_builds() -> None:
    """The engine writes its request on the stub itself: the same message tritonclient would send."""
    sampling = SamplingParameters(temperature=0.5, stop=("\n",)).to_json()
    ours = infer_request("m", "r-1", {"text_input": "é prompt", "sampling_parameters": sampling})
    theirs = _get_inference_request(
        model_name="m",
        inputs=[string_input("text_input", "é prompt"), string_input("sampling_parameters", sampling)],
        model_version="",
        request_id="r-1",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    assert ours == theirs


async def test_finished_generation_ends_the_stream_without_cancelling_it(
    triton: tuple[DecoupledModel, TritonEngine],
) -> None:
    model, engine = triton
    sampling = SamplingParameters(temperature=0.5, stop=("\n",))
    pieces = [piece async for piece in engine.generate(MODEL, "prompt", sampling, request_id="r")]
    assert pieces == [_piece(i, last=i == 3) for i in range(4)]
    assert await asyncio.wait_for(model.cancelled.get(), 5) is False
    assert model.sampling_parameters == [sampling.to_json()]


async def test_abandoned_generation_cancels_the_stream(
    triton: tuple[DecoupledModel, TritonEngine],
) -> None:
    model, engine = triton
    model.pieces = 1_000_000  # more than flow control lets through
    stream = engine.generate(MODEL, "prompt", SamplingParameters(), request_id="r")
    first = await anext(stream)
    assert first == _piece(0, last=False)
    await stream.aclose()  # the caller went away
    assert await asyncio.wait_for(model.cancelled.get(), 5) is True


async def test_a_fault_on_the_stream_is_a_typed_engine_error(
    triton: tuple[DecoupledModel, TritonEngine],
) -> None:
    model, engine = triton
    fault = EngineFault(code=EngineErrorCode.MODEL_UNLOADING, message="unloading", retry_after_seconds=1.0)
    model.error_message = fault.to_message()
    received: list[Piece] = []
    with pytest.raises(EngineFaulted) as err:
        async for piece in engine.generate(MODEL, "prompt", SamplingParameters(), request_id="r"):
            received.append(piece)
    assert err.value.fault == fault and len(received) == 3
