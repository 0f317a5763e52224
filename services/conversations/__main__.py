"""Conversations service process: stored chats (PostgreSQL) whose turns the Inference service answers."""

from ferry.conversations.v1 import conversations_pb2, conversations_pb2_grpc

from services.common.database import serve_from_database
from services.common.server import Runtime
from services.conversations.generation import Generation
from services.conversations.schema import MIGRATIONS
from services.conversations.servicer import ConversationsServicer
from services.conversations.store import ConversationStore
from services.conversations.token_count import TokenCounter
from services.recording import Recorder
from services.recording.process import run_audited

SERVICE = conversations_pb2.DESCRIPTOR.services_by_name["ConversationsService"].full_name


async def _setup(runtime: Runtime, recorder: Recorder) -> None:
    store = ConversationStore(await serve_from_database(runtime, MIGRATIONS))
    generation = Generation(runtime.settings)
    counter = TokenCounter(runtime.settings.triton)
    for close in (generation.close, counter.close):
        runtime.on_stop.insert(0, close)
    servicer = ConversationsServicer(runtime.settings, store, generation, counter, recorder)
    conversations_pb2_grpc.add_ConversationsServiceServicer_to_server(servicer, runtime.server)


if __name__ == "__main__":
    run_audited("conversations", lambda s: s.conversations, _setup, service_names=[SERVICE])
