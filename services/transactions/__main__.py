"""Transactions service process: the durable record of every inference request, in PostgreSQL."""

from ferry.transactions.v1 import transactions_pb2, transactions_pb2_grpc

from services.common.database import serve_from_database
from services.common.server import Runtime
from services.recording import Recorder
from services.recording.process import run_audited
from services.transactions.schema import MIGRATIONS
from services.transactions.servicer import TransactionsServicer

SERVICE = transactions_pb2.DESCRIPTOR.services_by_name["TransactionsService"].full_name


async def _setup(runtime: Runtime, recorder: Recorder) -> None:
    db = await serve_from_database(runtime, MIGRATIONS)
    transactions_pb2_grpc.add_TransactionsServiceServicer_to_server(TransactionsServicer(db), runtime.server)


if __name__ == "__main__":
    run_audited("transactions", lambda s: s.transactions, _setup, service_names=[SERVICE])
