"""The llamacpp backend serves any model directory, and stopping Triton mid-stream is a retryable fault.

Each test here starts its own tritonserver over a temporary model repository (the session's Triton
is left alone): the gemma-3-270m directory as shipped, plus a second directory over the same GGUF file
with other settings, which is all a new model needs.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import aio as triton_aio

from backends.llamacpp.contract import EngineErrorCode, EngineFault
from launcher.setup import read_model_config
from services.common.config import REPO_ROOT
from tests.triton.conftest import MODEL, start_triton
from tests.triton.test_gemma_model import PROMPT, Run, generate

pytestmark = pytest.mark.stack

SMALL = "gemma-small"
SMALL_SETTINGS = {"n_parallel": "1", "ctx_size": "2048", "context_length": "2048", "max_tokens": "1024"}


def _add_model_over_gemma(repository: Path, name: str, settings: dict[str, str]) -> None:
    """A new model directory: gemma's config.pbtxt with another name and other parameters; no code."""
    config = read_model_config(REPO_ROOT / "triton_models" / MODEL)
    config.name = name
    for key, value in settings.items():
        config.parameters[key].string_value = value
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(text_format.MessageToString(config))


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "triton_models" / MODEL, root / MODEL)
    _add_model_over_gemma(root, SMALL, SMALL_SETTINGS)
    yield root


async def _streaming(client: triton_aio.InferenceServerClient, params: dict[str, Any]) -> asyncio.Task[Run]:
    """A stream from the small model, once its first piece has arrived (the generation is running)."""
    first_piece = asyncio.Event()
    stream = asyncio.create_task(generate(client, PROMPT, params, lambda _: first_piece.set(), model=SMALL))
    await asyncio.wait_for(first_piece.wait(), 60)
    return stream


async def test_a_second_model_directory_is_served_with_its_own_settings(repository: Path) -> None:
    with start_triton(repository, (MODEL, SMALL)) as running:
        gemma, small = running.server(MODEL), running.server(SMALL)
        assert (small.n_parallel, small.context_length) == (1, 2048)
        assert (gemma.n_parallel, gemma.context_length) == (4, 4096)
        client = triton_aio.InferenceServerClient(running.grpc_target)
        try:
            runs = {
                model: await generate(client, PROMPT, {"max_tokens": 6, "ignore_eos": True}, model=model)
                for model in (MODEL, SMALL)
            }
            # The small model's own limits: its context and its max_tokens, not gemma's.
            too_long = await generate(client, "hello " * 2100, {"max_tokens": 4}, model=SMALL)
            too_many = await generate(client, PROMPT, {"max_tokens": 1025}, model=SMALL)
            fits_gemma = await generate(client, "hello " * 2100, {"max_tokens": 1}, model=MODEL)
        finally:
            await client.close()

    for run in runs.values():
        assert run.error is None, run.error
        assert run.text.strip() and run.tokens == 6 and run.last.finish_reason == "length"
    assert too_long.fault.code is EngineErrorCode.PROMPT_TOO_LONG
    assert too_long.fault.context_length == 2048
    assert too_many.fault.code is EngineErrorCode.INVALID_PARAMETER and too_many.fault.field == "max_tokens"
    assert fits_gemma.error is None, fits_gemma.error


async def test_stopping_triton_mid_stream_is_a_retryable_model_unloading_fault(repository: Path) -> None:
    with start_triton(repository, (SMALL,)) as running:
        client = triton_aio.InferenceServerClient(running.grpc_target)
        try:
            # 1024 tokens take minutes; the backend's shutdown monitor notices the exiting server and
            # ends the stream within about a second of SIGTERM.
            stream = await _streaming(client, {"max_tokens": 1024, "ignore_eos": True, "temperature": 1.0})
            running.process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            run = await asyncio.wait_for(stream, 60)
            ended_after = time.monotonic() - stopped
        finally:
            await client.close()

    assert run.pieces, "the stream had started"
    assert run.last.finish_reason == ""
    fault = run.fault
    assert fault.code is EngineErrorCode.MODEL_UNLOADING
    assert fault.retry_after_seconds == 1.0
    # Within Triton's exit timeout (5 s), with room for a loaded machine's slow tokens.
    assert ended_after < 5, f"the stream ended {ended_after:.1f} s after SIGTERM"


async def test_unloading_through_the_api_drains_streams_in_flight(repository: Path) -> None:
    with start_triton(repository, (SMALL,)) as running:
        client = triton_aio.InferenceServerClient(running.grpc_target)
        try:
            stream = await _streaming(client, {"max_tokens": 48, "ignore_eos": True})
            await client.unload_model(SMALL)
            run = await asyncio.wait_for(stream, 120)
            refused = await generate(client, PROMPT, {"max_tokens": 2}, model=SMALL)
        finally:
            await client.close()

    assert run.error is None, run.error
    assert (run.tokens, run.last.finish_reason) == (48, "length")
    assert refused.error is not None and EngineFault.from_message(refused.error) is None, "Triton's own error"
