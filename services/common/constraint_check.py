"""Asks the engine whether it can enforce an output constraint, without a caller's generation.

The grammar registry checks every grammar this way when it is created or updated, so that a broken
one is refused then rather than at its first use. The check is a one-token generation on a llamacpp
model: the backend compiles the constraint exactly as it would for a real request (llguidance for
Lark and JSON Schema, llama.cpp's own parser for GBNF) and answers INVALID_PARAMETER when it cannot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from backends.llamacpp.contract import EngineErrorCode, EngineFault, OutputConstraint, SamplingParameters
from services.common.config import TritonSettings
from services.common.errors import RpcError
from services.common.triton_client import connect, engine_unavailable, string_input

CHECK_SECONDS = 30.0


async def check_constraint(triton: TritonSettings, model: str, constraint: OutputConstraint) -> str | None:
    """None when the engine of `model` compiles `constraint`; else the engine's message.

    Raises RpcError ENGINE_UNAVAILABLE when the engine cannot be asked (nothing unchecked passes).
    """
    sampling = SamplingParameters(max_tokens=1, temperature=0.0, constraint=constraint)
    inputs = [string_input("text_input", " "), string_input("sampling_parameters", sampling.to_json())]

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": model, "inputs": inputs}

    client = connect(triton)
    try:
        async for result, error in client.stream_infer(requests(), stream_timeout=CHECK_SECONDS):
            if error is not None:
                fault = EngineFault.from_message(error.message())
                if fault is not None and fault.code is EngineErrorCode.INVALID_PARAMETER:
                    return fault.message
                raise _unavailable(model, error.message())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return None
    except RpcError:
        raise
    except Exception as err:  # Triton unreachable, timed out, or the stream broke
        raise _unavailable(model, str(err)) from err
    finally:
        await client.close()
    raise _unavailable(model, "the engine ended the check without an answer")


def _unavailable(model: str, why: str) -> RpcError:
    return engine_unavailable(model, "check the constraint", why)
