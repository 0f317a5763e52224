"""Audit service process: the append-only, hash-chained audit log, in PostgreSQL."""

from ferry.audit.v1 import audit_pb2, audit_pb2_grpc

from services.audit.schema import MIGRATIONS
from services.audit.servicer import AuditServicer
from services.common.config import get_settings
from services.common.database import serve_from_database
from services.common.server import Runtime
from services.recording import Recorder
from services.recording.process import run_audited

SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name


async def _setup(runtime: Runtime, recorder: Recorder) -> None:
    db = await serve_from_database(runtime, MIGRATIONS)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(db), runtime.server)


if __name__ == "__main__":
    # This process audits its own RPCs too: its spool delivers them to itself through AppendEvents,
    # which the observer leaves out, so auditing never recurses. No flush at stop: a draining service
    # cannot take deliveries, so its last events wait in the spool for the next start.
    recorder = Recorder(get_settings(), "audit", stop_flush_seconds=0.0)
    run_audited("audit", lambda s: s.audit, _setup, service_names=[SERVICE], recorder=recorder)
