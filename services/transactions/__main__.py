"""Transactions service process (placeholder until the records issue: health only)."""

import asyncio

from services.common.server import Runtime, serve


async def _setup(runtime: Runtime) -> None:
    return None


if __name__ == "__main__":
    asyncio.run(serve("transactions", lambda s: s.transactions, _setup, service_names=[]))
