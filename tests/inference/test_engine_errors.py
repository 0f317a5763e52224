"""How the Triton model's error messages (its contract) become API errors (pure logic)."""

from __future__ import annotations

import grpc

from services.inference.generation import Api, GenerationRequest, Message, Sampling
from services.inference.pipeline import _engine_error
from services.inference.triton import EngineError, EngineRejected, PromptTooLong, classify_model_error

CHAT = GenerationRequest(api=Api.CHAT, model="m", sampling=Sampling(), messages=(Message("user", "x"),))
NATIVE = GenerationRequest(api=Api.GENERATE, model="m", sampling=Sampling(), prompt="x")


def test_prompt_too_long_keeps_both_counts_and_names_the_input_field() -> None:
    err = classify_model_error("[PROMPT_TOO_LONG prompt_tokens=5002 context_length=4096] too long")
    assert isinstance(err, PromptTooLong) and (err.prompt_tokens, err.context_length) == (5002, 4096)
    rpc = _engine_error(err, CHAT)
    assert rpc.code == grpc.StatusCode.INVALID_ARGUMENT and rpc.reason == "PROMPT_TOO_LONG"
    assert rpc.field_violations[0][0] == "messages"
    assert "5002" in rpc.message and "4096" in rpc.message
    assert rpc.metadata["prompt_tokens"] == "5002" and rpc.metadata["context_length"] == "4096"
    assert _engine_error(err, NATIVE).field_violations[0][0] == "prompt"


def test_invalid_argument_from_the_model_names_the_field_in_the_callers_terms() -> None:
    err = classify_model_error("[INVALID_ARGUMENT field=seed] must be at most 4294967295")
    assert isinstance(err, EngineRejected) and err.field == "seed"
    assert _engine_error(err, CHAT).field_violations[0] == ("seed", "must be at most 4294967295")
    assert _engine_error(err, NATIVE).field_violations[0][0] == "sampling.seed"


def test_unknown_model_in_triton_is_unavailable() -> None:
    err = classify_model_error("Request for unknown model: 'm' is not found")
    assert err.code == grpc.StatusCode.UNAVAILABLE


def test_other_engine_errors_are_internal() -> None:
    err = classify_model_error("llama_decode failed")
    assert err.code == grpc.StatusCode.INTERNAL
    assert _engine_error(err, CHAT).reason == "ENGINE_ERROR"


def test_deadline_is_deadline_exceeded() -> None:
    rpc = _engine_error(EngineError(grpc.StatusCode.DEADLINE_EXCEEDED, "x"), CHAT)
    assert rpc.code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in rpc.message
