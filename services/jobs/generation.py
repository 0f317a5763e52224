"""A job's generation, run through the Inference service's own API like any interactive request:
same validation, admission, records, audit and usage, on the job creator's behalf.

The call carries the job id as its request id (so its transaction record is `transactions/{job id}`,
one whatever the number of attempts) and `x-ferry-priority: background`, so the Inference service
admits it only on spare engine capacity (services/inference/admission.py).
"""

from __future__ import annotations

import grpc
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from ferry.jobs.v1 import jobs_pb2
from ferry.openai.v1 import openai_pb2_grpc

from services.common.config import Settings
from services.common.context import REQUEST_ID_HEADER
from services.common.edge import on_behalf_metadata
from services.common.server import SERVER_OPTIONS
from services.inference.admission import BACKGROUND, PRIORITY_HEADER
from services.jobs.domain import StoredJob


class Generation:
    """The Inference service over gRPC (one channel per process, made on first use: a grpc.aio
    channel belongs to the running event loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = inference_channel(self.settings)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def run(self, job: StoredJob) -> jobs_pb2.JobResult:
        """The job's answer; raises grpc.aio.AioRpcError as the Inference service answers. Cancelling
        the awaiting task cancels the call, and the Inference service frees the engine slot."""
        channel = self._open()
        metadata = [
            (REQUEST_ID_HEADER, job.id),
            (PRIORITY_HEADER, BACKGROUND),
            *on_behalf_metadata(self.settings.auth, job.principal),
        ]
        timeout = self.settings.jobs.run_timeout_seconds
        request = job.request
        if job.kind == "chat_completion":
            chat = await openai_pb2_grpc.OpenAIServiceStub(channel).CreateChatCompletion(
                request.chat_completion, metadata=metadata, timeout=timeout
            )
            return jobs_pb2.JobResult(chat_completion=chat)
        if job.kind == "completion":
            completion = await openai_pb2_grpc.OpenAIServiceStub(channel).CreateCompletion(
                request.completion, metadata=metadata, timeout=timeout
            )
            return jobs_pb2.JobResult(completion=completion)
        generate = inference_pb2.GenerateRequest()
        generate.CopyFrom(request.generate)
        generate.request_id = job.id
        answer = await inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            generate, metadata=metadata, timeout=timeout
        )
        return jobs_pb2.JobResult(generate=answer)


def inference_channel(settings: Settings) -> grpc.aio.Channel:
    """A channel to every Inference replica the name resolves to (round robin per call): each replica
    admits background work on its own spare slots, so a worker spreads its jobs over all of them."""
    return grpc.aio.insecure_channel(
        f"dns:///{settings.inference.address}",
        options=[*SERVER_OPTIONS, ("grpc.lb_policy_name", "round_robin")],
    )
