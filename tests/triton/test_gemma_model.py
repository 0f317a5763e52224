"""The Triton LLM model `gemma-3-270m` (llamacpp backend) against a real tritonserver and the real model.

These tests speak the wire contract the Inference service depends on (see backends/llamacpp/README.md):
streamed pieces, the final response, token counts, errors as EngineFault JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tritonclient.grpc import InferInput
from tritonclient.grpc import aio as triton_aio

from backends.llamacpp.contract import EngineErrorCode, EngineFault
from tests.triton.conftest import MODEL, TritonServer

pytestmark = pytest.mark.stack

PROMPT = "The capital of France is"


@dataclass
class Piece:
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str
    logprobs: str
    final: bool


@dataclass
class Run:
    pieces: list[Piece] = field(default_factory=list)
    error: str | None = None
    first_piece_seconds: float | None = None

    @property
    def fault(self) -> EngineFault:
        """The error the stream ended with, as the engine contract's fault."""
        assert self.error is not None, "the stream ended without an error"
        fault = EngineFault.from_message(self.error)
        assert fault is not None, f"not an EngineFault: {self.error}"
        return fault

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.pieces)

    @property
    def last(self) -> Piece:
        return self.pieces[-1]


def _inputs(prompt: str, params: dict[str, Any] | str | None) -> list[InferInput]:
    text = InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    if params is None:
        return [text]
    raw = params if isinstance(params, str) else json.dumps(params)
    sampling = InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([raw.encode()], dtype=np.object_))
    return [text, sampling]


def _string(result: Any, name: str) -> str:
    value: bytes = result.as_numpy(name)[0]
    return value.decode()


async def generate(
    client: triton_aio.InferenceServerClient,
    prompt: str,
    params: dict[str, Any] | str | None = None,
    on_piece: Any = None,
    model: str = MODEL,
) -> Run:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": model, "inputs": _inputs(prompt, params)}

    run = Run()
    started = time.monotonic()
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            run.error = error.message()
            break
        if run.first_piece_seconds is None:
            run.first_piece_seconds = time.monotonic() - started
        piece = Piece(
            text=_string(result, "text_output"),
            tokens=int(result.as_numpy("num_output_tokens")[0]),
            prompt_tokens=int(result.as_numpy("num_input_tokens")[0]),
            finish_reason=_string(result, "finish_reason"),
            logprobs=_string(result, "logprobs"),
            final=result.get_response().parameters["triton_final_response"].bool_param,
        )
        run.pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)
        if piece.final:
            break
    return run


@pytest.fixture
async def client(triton: TritonServer) -> AsyncIterator[triton_aio.InferenceServerClient]:
    client = triton_aio.InferenceServerClient(triton.grpc_target)
    yield client
    await client.close()


async def test_streams_pieces_then_one_final_response(client: triton_aio.InferenceServerClient) -> None:
    run = await generate(client, PROMPT, {"max_tokens": 12, "temperature": 0})

    assert run.error is None
    assert len(run.pieces) > 2, "the text arrives in several pieces"
    assert [p.final for p in run.pieces] == [False] * (len(run.pieces) - 1) + [True]
    assert all(p.finish_reason == "" for p in run.pieces[:-1])
    assert run.last.finish_reason in ("stop", "length")
    assert run.text.strip()
    assert all(p.text for p in run.pieces[:-1]), "only the final piece may be empty"
    # Usage: every piece names the prompt size, and the pieces' token counts add up to the output.
    prompt_tokens = {p.prompt_tokens for p in run.pieces}
    assert len(prompt_tokens) == 1 and prompt_tokens.pop() >= 5
    assert 1 <= run.tokens <= 12
    assert all(p.logprobs == "" for p in run.pieces), "no logprobs unless asked for"


async def test_max_tokens_ends_with_length(client: triton_aio.InferenceServerClient) -> None:
    run = await generate(client, PROMPT, {"max_tokens": 5, "ignore_eos": True})

    assert run.error is None
    assert run.last.finish_reason == "length"
    assert run.tokens == 5


async def test_stop_sequence_ends_generation_and_is_not_returned(
    client: triton_aio.InferenceServerClient,
) -> None:
    prompt = "Count with me: 1, 2, 3, 4,"
    reference = await generate(client, prompt, {"max_tokens": 16, "temperature": 0, "ignore_eos": True})
    assert reference.error is None
    # A stop sequence taken from the middle of what greedy decoding says anyway.
    middle = len(reference.text) // 2
    stop = reference.text[middle : middle + 2]
    assert stop.strip(), f"pick a visible stop string from {reference.text!r}"
    expected = reference.text[: reference.text.index(stop)]

    run = await generate(client, prompt, {"max_tokens": 16, "temperature": 0, "stop": [stop, "never-seen"]})

    assert run.error is None
    assert run.last.finish_reason == "stop"
    assert run.text == expected
    assert stop not in run.text


async def test_same_seed_gives_same_text(client: triton_aio.InferenceServerClient) -> None:
    def params(seed: int) -> dict[str, Any]:
        return {"max_tokens": 16, "temperature": 1.0, "seed": seed, "ignore_eos": True}

    first = await generate(client, PROMPT, params(1234))
    again = await generate(client, PROMPT, params(1234))
    others = [await generate(client, PROMPT, params(seed)) for seed in (1, 2)]

    assert first.error is None and first.text
    assert again.text == first.text
    assert {first.text, *(o.text for o in others)} != {first.text}, "other seeds sample other text"


async def test_cancelling_streams_frees_their_slots(
    client: triton_aio.InferenceServerClient, triton: TritonServer
) -> None:
    """With every slot busy on a long generation, cancelled streams give their slots back at once."""
    slots = triton.n_parallel
    started = {i: asyncio.Event() for i in range(slots)}
    finished: list[Run] = []

    async def long_stream(i: int) -> None:
        def on_piece(piece: Piece) -> None:
            if len(piece.text) and piece.tokens:
                started[i].set()

        params = {"max_tokens": 2000, "ignore_eos": True, "temperature": 1.0}
        finished.append(await generate(client, f"Story number {i}: Once upon a time", params, on_piece))

    streams = [asyncio.create_task(long_stream(i)) for i in range(slots)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 60)
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    assert finished == [], "the long generations were still running when cancelled"

    run = await generate(client, PROMPT, {"max_tokens": 2})

    assert run.error is None, run.error
    assert run.first_piece_seconds is not None
    assert run.first_piece_seconds < 2.0, f"first token after {run.first_piece_seconds:.2f} s"


async def test_prompt_longer_than_context_is_refused(
    client: triton_aio.InferenceServerClient, triton: TritonServer
) -> None:
    context = triton.context_length
    run = await generate(client, "hello " * (context + 50), {"max_tokens": 4})

    assert run.pieces == []
    fault = run.fault
    assert fault.code is EngineErrorCode.PROMPT_TOO_LONG
    assert fault.limit == "model"
    assert fault.prompt_tokens is not None and fault.prompt_tokens > context
    assert fault.context_length == context
    assert fault.message


async def test_prompt_longer_than_the_callers_limit_is_refused(
    client: triton_aio.InferenceServerClient,
) -> None:
    run = await generate(client, "hello " * 40, {"max_tokens": 4, "max_prompt_tokens": 10})

    assert run.pieces == []
    fault = run.fault
    assert fault.code is EngineErrorCode.PROMPT_TOO_LONG
    assert fault.limit == "caller"
    assert fault.prompt_tokens is not None and fault.prompt_tokens > 10
    assert fault.context_length == 10


@pytest.mark.parametrize(
    ("params", "field_name"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4097}, "max_tokens"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": [1]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": "seven"}, "seed"),
        ({"best_of": 2}, "best_of"),
        ("{not json", "sampling_parameters"),
        ("[1, 2]", "sampling_parameters"),
    ],
)
async def test_invalid_sampling_parameters_name_the_field(
    client: triton_aio.InferenceServerClient, params: dict[str, Any] | str, field_name: str
) -> None:
    run = await generate(client, PROMPT, params)

    assert run.pieces == []
    fault = run.fault
    assert fault.code is EngineErrorCode.INVALID_PARAMETER
    assert fault.field == field_name
    assert fault.message


async def test_logprobs_for_every_token(client: triton_aio.InferenceServerClient) -> None:
    run = await generate(
        client, PROMPT, {"max_tokens": 4, "ignore_eos": True, "logprobs": True, "top_logprobs": 3}
    )

    assert run.error is None
    entries = [entry for piece in run.pieces for entry in json.loads(piece.logprobs)]
    for piece in run.pieces:
        assert len(json.loads(piece.logprobs)) == piece.tokens
    assert len(entries) == run.tokens == 4
    assert "".join(e["token"] for e in entries) == run.text
    for entry in entries:
        assert set(entry) == {"token", "logprob", "top_logprobs"}
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        assert all(set(t) == {"token", "logprob"} for t in entry["top_logprobs"])


def test_metadata_describes_the_model(triton: TritonServer) -> None:
    params = triton.parameters
    assert triton.context_length == int(params["ctx_size"]) // triton.n_parallel >= 2048
    assert 1 <= int(params["max_tokens"]) <= triton.context_length
    assert params["owned_by"] == "google"


@pytest.fixture
def chat_template(triton: TritonServer) -> Iterator[Any]:
    yield ImmutableSandboxedEnvironment().from_string(triton.parameters["chat_template"])


def test_chat_template_renders_gemma_turns(chat_template: Any) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi there "},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}],
        },
    ]

    prompt = chat_template.render(messages=messages, add_generation_prompt=True)

    assert prompt == (
        "<start_of_turn>user\nAnswer briefly.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a\ncolour.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "<bos>" not in prompt, "llama.cpp adds BOS itself"
    assert not chat_template.render(messages=messages[:2], add_generation_prompt=False).endswith(
        "<start_of_turn>model\n"
    )


async def test_chat_prompt_generates_a_turn(
    client: triton_aio.InferenceServerClient, chat_template: Any
) -> None:
    prompt = chat_template.render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    run = await generate(client, prompt, {"max_tokens": 24, "temperature": 0})

    assert run.error is None and run.text.strip()
    assert "<start_of_turn>" not in run.text and "<end_of_turn>" not in run.text


def _metric(text: str, name: str, model: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and f'model="{model}"' in line:
            return float(line.rsplit(None, 1)[1])
    raise AssertionError(f"{name} for {model} not in Triton's metrics")


async def test_prompt_cache_is_bounded_and_its_use_is_a_metric(
    client: triton_aio.InferenceServerClient, triton: TritonServer
) -> None:
    if triton.metrics_url is None:
        pytest.skip("an external Triton's metrics port is not known")
    metrics = httpx.AsyncClient()
    before = (await metrics.get(triton.metrics_url)).text
    prompt = "A long and unusual prompt that no other test sends: " + "lorem ipsum dolor " * 20
    first = await generate(client, prompt, {"max_tokens": 2})
    again = await generate(client, prompt, {"max_tokens": 2})
    after = (await metrics.get(triton.metrics_url)).text
    await metrics.aclose()

    assert first.error is None and again.error is None
    limit = _metric(after, "ferry_engine_prompt_cache_limit_bytes", MODEL)
    assert limit == int(triton.parameters["prompt_cache_mib"]) * 2**20
    prompt_tokens = _metric(after, "ferry_engine_prompt_tokens_total", MODEL) - _metric(
        before, "ferry_engine_prompt_tokens_total", MODEL
    )
    assert prompt_tokens == first.last.prompt_tokens + again.last.prompt_tokens
    cached = _metric(after, "ferry_engine_prompt_tokens_cached_total", MODEL) - _metric(
        before, "ferry_engine_prompt_tokens_cached_total", MODEL
    )
    # The same prompt again is served from the slot's cache (most of it: checkpoints of Gemma's
    # sliding-window layers decide where reuse can start).
    assert cached >= again.last.prompt_tokens // 2
