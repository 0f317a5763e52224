"""Transactions service process: the durable record of every inference request, in PostgreSQL."""

import asyncio

from ferry.transactions.v1 import transactions_pb2, transactions_pb2_grpc

from services.common.config import get_settings
from services.common.database import serve_from_database
from services.common.server import Runtime, serve
from services.recording import Recorder
from services.recording.audit_observer import AuditObserver
from services.transactions.schema import MIGRATIONS
from services.transactions.servicer import TransactionsServicer

SERVICE = transactions_pb2.DESCRIPTOR.services_by_name["TransactionsService"].full_name

recorder = Recorder(get_settings(), "transactions")


async def _setup(runtime: Runtime) -> None:
    await recorder.start(runtime)
    db = await serve_from_database(runtime, MIGRATIONS)
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
