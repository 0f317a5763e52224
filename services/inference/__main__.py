"""Inference service process (placeholder until the inference issue: health only)."""

import asyncio

from services.common.server import Runtime, serve


async def _setup(runtime: Runtime) -> None:
    return None


if __name__ == "__main__":
    asyncio.run(serve("inference", lambda s: s.inference, _setup, service_names=[]))
