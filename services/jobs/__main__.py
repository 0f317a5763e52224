"""Jobs service process: the JobsService (jobs in PostgreSQL, queued on NATS JetStream) and the NATS
bridge. The workers are processes of their own (`python -m services.jobs.worker`)."""

from ferry.jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.common.database import serve_from_database
from services.common.server import Runtime
from services.jobs.bridge import Bridge
from services.jobs.dispatch import Dispatch
from services.jobs.ingest import WebhookIngestion
from services.jobs.schema import MIGRATIONS
from services.jobs.servicer import JobsServicer
from services.jobs.store import JobStore
from services.jobs.webhooks import JobWebhooks
from services.recording import Recorder
from services.recording.process import run_audited

SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobsService"].full_name


async def _setup(runtime: Runtime, recorder: Recorder) -> None:
    db = await serve_from_database(runtime, MIGRATIONS)
    store = JobStore(db)
    dispatch = Dispatch(runtime.settings, store)
    bridge = Bridge(runtime.settings)
    # This process delivers the webhooks' events (the workers only queue them).
    webhooks = JobWebhooks(runtime.settings)
    await webhooks.start(deliver=True)
    await dispatch.start()
    await bridge.start()
    for stop in (webhooks.stop, dispatch.stop, bridge.stop):
        runtime.on_stop.insert(0, stop)
    servicer = JobsServicer(store, dispatch, recorder, webhooks)
    servicer.ingestion = WebhookIngestion(runtime.settings, db, servicer.create_for, recorder)
    jobs_pb2_grpc.add_JobsServiceServicer_to_server(servicer, runtime.server)


if __name__ == "__main__":
    run_audited("jobs", lambda s: s.jobs, _setup, service_names=[SERVICE])
