"""Grammars service process: the registry of grammars that generation requests name, in PostgreSQL."""

from ferry.grammars.v1 import grammars_pb2, grammars_pb2_grpc

from services.common.database import serve_from_database
from services.common.server import Runtime
from services.grammars.engine_check import EngineCheck
from services.grammars.schema import MIGRATIONS
from services.grammars.servicer import GrammarsServicer
from services.grammars.store import GrammarStore
from services.recording import Recorder
from services.recording.process import run_audited

SERVICE = grammars_pb2.DESCRIPTOR.services_by_name["GrammarsService"].full_name


async def _setup(runtime: Runtime, recorder: Recorder) -> None:
    store = GrammarStore(await serve_from_database(runtime, MIGRATIONS))
    servicer = GrammarsServicer(store, EngineCheck(runtime.settings.triton), recorder)
    grammars_pb2_grpc.add_GrammarsServiceServicer_to_server(servicer, runtime.server)


if __name__ == "__main__":
    run_audited("grammars", lambda s: s.grammars, _setup, service_names=[SERVICE])
