"""Every engine failure -> the caller's error (pure logic): each EngineErrorCode of the contract, and
Triton's own failures, to a gRPC code and catalogue reason, fields named as each API spells them."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from backends.llamacpp.contract import EngineErrorCode, EngineFault
from services.common.errors import CATALOGUE, Reason, RpcError
from services.inference.engine_errors import FAULT_REASONS, caller_error, markdown_table
from services.inference.engine_interface import (
    EngineBroken,
    EngineError,
    EngineFaulted,
    EngineRefused,
    EngineTimedOut,
    EngineUnreachable,
)
from services.inference.triton_engine import engine_error_from_rpc, engine_error_from_stream
from tests.inference.test_wire_parsing import chat, completion, generate

CHAT = chat(max_completion_tokens=5).spelling
COMPLETION = completion().spelling
NATIVE = generate(prompt="x").spelling
NATIVE_CHAT = generate(messages={"messages": [{"role": "user", "content": "x"}]}).spelling


def fault(code: EngineErrorCode, **detail: object) -> EngineFaulted:
    return EngineFaulted(EngineFault(code=code, message="m", **detail))  # type: ignore[arg-type]


# (failure, gRPC code, reason, retry hint?) for every kind; field naming is tested below.
TABLE: list[tuple[EngineError, grpc.StatusCode, Reason, bool]] = [
    (
        fault(EngineErrorCode.PROMPT_TOO_LONG, prompt_tokens=9, context_length=8, limit="model"),
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.PROMPT_TOO_LONG,
        False,
    ),
    (
        fault(EngineErrorCode.INVALID_PARAMETER, field="top_p"),
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_ARGUMENT,
        False,
    ),
    (
        fault(EngineErrorCode.MODEL_UNLOADING, retry_after_seconds=2.0),
        grpc.StatusCode.UNAVAILABLE,
        Reason.ENGINE_UNAVAILABLE,
        True,
    ),
    (fault(EngineErrorCode.ENGINE_FAILED), grpc.StatusCode.INTERNAL, Reason.ENGINE_ERROR, False),
    (EngineUnreachable("socket closed"), grpc.StatusCode.UNAVAILABLE, Reason.ENGINE_UNAVAILABLE, True),
    (EngineTimedOut("deadline"), grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED, False),
    (EngineRefused("unknown model"), grpc.StatusCode.INTERNAL, Reason.ENGINE_ERROR, False),
    (EngineBroken("no final response"), grpc.StatusCode.INTERNAL, Reason.ENGINE_ERROR, False),
]


DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def test_the_table_covers_every_code_of_the_contract() -> None:
    covered = {err.fault.code for err, *_ in TABLE if isinstance(err, EngineFaulted)}
    assert covered == set(EngineErrorCode) == set(FAULT_REASONS)


def test_docs_show_the_mapping() -> None:
    assert markdown_table() in DOCS.read_text(), "regenerate: python -m services.inference.engine_errors"


@pytest.mark.parametrize(("err", "code", "reason", "retryable"), TABLE)
def test_each_failure_maps_to_one_catalogued_error(
    err: EngineError, code: grpc.StatusCode, reason: Reason, retryable: bool
) -> None:
    rpc = caller_error(err, CHAT)
    assert (rpc.code, rpc.reason) == (code, reason.value)
    assert CATALOGUE[reason].code == code
    assert (rpc.retry_after_seconds is not None) == retryable


def test_unloading_carries_the_engines_retry_delay() -> None:
    rpc = caller_error(fault(EngineErrorCode.MODEL_UNLOADING, retry_after_seconds=3.0), NATIVE)
    assert rpc.retry_after_seconds == 3.0
    assert ("retry-after", "3") in rpc.to_status().trailing_metadata  # type: ignore[attr-defined]


def test_triton_refusing_a_model_that_is_no_longer_ready_is_retryable() -> None:
    rpc = caller_error(EngineRefused("Request for unknown model"), CHAT, model_ready=False)
    assert (rpc.code, rpc.reason) == (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY")
    assert rpc.retry_after_seconds is not None


@pytest.mark.parametrize(
    ("spelling", "field"),
    [(CHAT, "messages"), (COMPLETION, "prompt"), (NATIVE, "prompt"), (NATIVE_CHAT, "messages.messages")],
)
def test_prompt_too_long_names_the_input_as_the_caller_spelled_it(spelling: object, field: str) -> None:
    err = fault(EngineErrorCode.PROMPT_TOO_LONG, prompt_tokens=5002, context_length=4096, limit="model")
    rpc = caller_error(err, spelling)  # type: ignore[arg-type]
    assert rpc.field_violations[0][0] == field
    assert rpc.metadata["prompt_tokens"] == "5002" and rpc.metadata["context_length"] == "4096"
    assert "context length of 4096" in rpc.message


def test_prompt_too_long_for_the_callers_key_says_so() -> None:
    err = fault(EngineErrorCode.PROMPT_TOO_LONG, prompt_tokens=30, context_length=20, limit="caller")
    rpc = caller_error(err, CHAT)
    assert "more than the 20 allowed for this API key (max_prompt_tokens)" in rpc.message


@pytest.mark.parametrize(
    ("spelling", "engine_field", "field"),
    [
        (CHAT, "seed", "seed"),
        (CHAT, "max_tokens", "max_completion_tokens"),
        (COMPLETION, "top_logprobs", "logprobs"),
        (NATIVE, "seed", "sampling.seed"),
        (NATIVE, "text_input", "prompt"),
    ],
)
def test_invalid_parameter_names_the_field_as_the_caller_spelled_it(
    spelling: object, engine_field: str, field: str
) -> None:
    rpc = caller_error(fault(EngineErrorCode.INVALID_PARAMETER, field=engine_field), spelling)  # type: ignore[arg-type]
    assert rpc.field_violations[0] == (field, "m")


def test_stream_errors_are_read_by_the_contract_never_by_their_wording() -> None:
    sent = EngineFault(
        code=EngineErrorCode.MODEL_UNLOADING, message="the model is being unloaded", retry_after_seconds=1
    )
    parsed = engine_error_from_stream(sent.to_message())
    assert isinstance(parsed, EngineFaulted) and parsed.fault == sent
    # Prose, even prose that looks like the old prefixes, is Triton's own error, not a fault.
    for text in (
        "Request for unknown model: 'm' is not found",
        "[PROMPT_TOO_LONG prompt_tokens=9 context_length=8]",
    ):
        assert isinstance(engine_error_from_stream(text), EngineRefused)


def test_an_unmapped_error_is_still_an_rpc_error() -> None:
    assert isinstance(caller_error(EngineError("anything"), CHAT), RpcError)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, EngineUnreachable),
        (grpc.StatusCode.CANCELLED, EngineUnreachable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, EngineTimedOut),
        (grpc.StatusCode.INTERNAL, EngineRefused),
    ],
)
def test_a_failed_triton_stream_is_typed_by_its_grpc_code(
    code: grpc.StatusCode, kind: type[EngineError]
) -> None:
    err = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")
    assert type(engine_error_from_rpc(err)) is kind
