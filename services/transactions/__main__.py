"""Transactions service process: the durable record of every inference request, in PostgreSQL."""

import asyncio

from ferry.transactions.v1 import transactions_pb2, transactions_pb2_grpc

from services.common.audit_observer import AuditObserver
from services.common.config import get_settings
from services.common.database import Database
from services.common.server import Runtime, serve
from services.recording import Recorder
from services.transactions.schema import MIGRATIONS
from services.transactions.servicer import TransactionsServicer

SERVICE = transactions_pb2.DESCRIPTOR.services_by_name["TransactionsService"].full_name

recorder = Recorder(get_settings(), "transactions")


async def _setup(runtime: Runtime) -> None:
    await recorder.start(runtime)

    async def on_health(healthy: bool) -> None:
        # The database is this service's dependency: without it nothing here can answer.
        await runtime.set_serving(healthy and not runtime.lifecycle.draining)

    db = Database(runtime.settings, MIGRATIONS, on_health)
    await runtime.set_serving(False)
    await db.start()
    runtime.on_stop.insert(0, db.stop)
    transactions_pb2_grpc.add_TransactionsServiceServicer_to_server(TransactionsServicer(db), runtime.server)


if __name__ == "__main__":
    asyncio.run(
        serve(
            "transactions",
            lambda s: s.transactions,
            _setup,
            service_names=[SERVICE],
            observers=[AuditObserver(recorder)],
        )
    )
