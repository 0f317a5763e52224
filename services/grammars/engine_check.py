"""The engine's word on a grammar before it is stored: compiled on Triton's default model, so a broken
grammar is refused when it is created or updated, not at its first use. Nothing unchecked is stored:
while Triton cannot answer, a change is UNAVAILABLE (retryable)."""

from __future__ import annotations

import logging
import time

from prometheus_client import Histogram

from services.common.config import TritonSettings
from services.common.constraint_check import check_constraint
from services.common.errors import Reason, RpcError, invalid_argument, rpc_error
from services.grammars.domain import GrammarFields

log = logging.getLogger(__name__)

CHECK_LATENCY = Histogram(
    "ferry_grammar_check_seconds",
    "Time the engine took to check a grammar on create or update, by syntax and outcome.",
    ["syntax", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class EngineCheck:
    def __init__(self, triton: TritonSettings) -> None:
        self.triton = triton

    async def __call__(self, fields: GrammarFields, field: str) -> None:
        """Returns when the engine compiles the grammar; else INVALID_ARGUMENT naming `field` with
        the engine's message (GRAMMAR_INVALID), or TRITON_UNAVAILABLE."""
        model = self.triton.default_model
        started = time.monotonic()
        outcome = "unavailable"
        try:
            problem = await check_constraint(self.triton, model, fields.constraint())
            outcome = "refused" if problem else "compiled"
        except RpcError as err:
            if err.code.name != "UNAVAILABLE":
                raise
            raise rpc_error(
                Reason.TRITON_UNAVAILABLE,
                # What the caller must know first: error texts are cut at 512 bytes, engine details are long.
                f"the engine cannot check the grammar now; nothing was stored, retry shortly ({err.message})",
            ) from err
        except Exception as exc:
            log.warning("grammar check on %s failed: %s", model, exc)
            raise rpc_error(
                Reason.TRITON_UNAVAILABLE,
                f"the engine cannot check the grammar now; nothing was stored ({type(exc).__name__})",
            ) from exc
        finally:
            CHECK_LATENCY.labels(fields.syntax.value, outcome).observe(time.monotonic() - started)
        if problem:
            raise invalid_argument(field, f"the engine cannot compile it: {problem}", Reason.GRAMMAR_INVALID)
