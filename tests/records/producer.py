"""A stand-in for the Inference process in crash tests: it records requests exactly as Inference does.

`python -m tests.records.producer NAME PRINCIPAL serve` answers requests one after another, forever:
start record, a little "generation", finish record, then prints `answered <request id>` (the moment a
client would get its answer). Every 7th request is left open (`open <request id>`) as if still
generating. The test kills it with SIGKILL at some point.

`python -m tests.records.producer NAME PRINCIPAL recover` starts the same spool again (which turns the
open requests into incomplete records), waits until everything is delivered, prints `delivered`.

Settings come from the FERRY_* environment, like a real service.
"""

from __future__ import annotations

import asyncio
import sys

from services.common.config import Settings
from services.recording import Recorder


async def serve(recorder: Recorder, principal: str) -> None:
    i = 0
    while True:
        i += 1
        rid = f"{principal}-{i:05d}"
        recorder.transaction_started(
            rid, model="gemma-3-270m", principal=principal, prompt=f"prompt {i}", parameters={"max_tokens": 8}
        )
        print(f"started {rid}", flush=True)
        await asyncio.sleep(0.005)
        if i % 7 == 0:
            print(f"open {rid}", flush=True)
            continue
        recorder.transaction_finished(
            rid,
            status="succeeded",
            output=f"output {i}",
            finish_reason="stop",
            prompt_tokens=2,
            completion_tokens=8,
        )
        print(f"answered {rid}", flush=True)


async def main() -> None:
    name, principal, mode = sys.argv[1:4]
    recorder = Recorder(Settings(), name)
    await recorder.start()
    if mode == "serve":
        await serve(recorder, principal)
    delivered = await recorder.flush(60)
    print("delivered" if delivered else f"not delivered: {recorder.depth()}", flush=True)
    await recorder.stop()
    recorder.close()


if __name__ == "__main__":
    asyncio.run(main())
