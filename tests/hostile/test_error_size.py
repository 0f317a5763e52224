"""Found by the hostile-input suite: GET /v1/models/{model} (RetrieveModel) with a model name of 3000
emoji answered UNAVAILABLE: errors.TEXT_LIMIT cut quoted input to 2000 *characters*, 8000 bytes of
UTF-8 that the trailers carry several times (percent-encoded in grpc-message, in the status details,
\\u-escaped in OpenAI's error JSON), past what Envoy accepts, so the stream was reset; and at 2000 ASCII characters
gRPC clients still refused the trailers at random (RESOURCE_EXHAUSTED, "received metadata size
exceeds soft limit (12013 vs. 8192)"). Texts are now cut to 512 bytes."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import TEXT_LIMIT, Reason, openai_error_json, rpc_error


@pytest.mark.parametrize("piece", ["a", "é", "🦜", "\ud800"])
def test_an_error_quoting_huge_input_keeps_its_trailers_small(piece: str) -> None:
    name = piece * 20000
    err = rpc_error(
        Reason.MODEL_NOT_FOUND,
        f"model '{name}' does not exist",
        metadata={"model": name},
        field_violations=[(name, name)],
    )
    assert len(err.message.encode("utf-8", "surrogatepass")) <= TEXT_LIMIT
    assert err.message.endswith("...")
    status = err.to_status()
    # Binary trailers travel base64-encoded.
    trailers = sum(
        len(k) + (len(v) * 4 // 3 if k.endswith("-bin") else len(v))
        for k, v in status.trailing_metadata  # type: ignore[attr-defined]
    )
    # grpc-message is percent-encoded on the wire (3 bytes per non-ASCII byte).
    message_bytes = 3 * len(status.details.encode("utf-8", "surrogatepass"))  # type: ignore[attr-defined]
    openai = len(openai_error_json(err))
    assert status.code == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    # gRPC clients refuse received metadata past 8 KiB at random (RESOURCE_EXHAUSTED "received
    # metadata size exceeds soft limit"); Envoy resets a stream whose headers pass ~60 KiB.
    assert trailers + message_bytes + openai < 8 * 1024
