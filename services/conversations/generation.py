"""A turn's answer, generated through the Inference service's own API like any interactive request
(validation, admission, transaction record, audit, limits), on the caller's behalf: the caller's
Principal travels beside the service token (services/common/edge.py), so the Inference service checks
the caller's own scopes and limits and records the request as theirs."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import grpc
from ferry.auth.v1.auth_pb2 import Principal
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.config import Settings
from services.common.context import REQUEST_ID_HEADER
from services.common.edge import on_behalf_metadata
from services.common.errors import relay_error
from services.common.server import SERVER_OPTIONS
from services.inference.domain import Message


class Generation:
    """The Inference service over gRPC (one channel per process, made on first use: a grpc.aio
    channel belongs to the running event loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.settings.inference.address, options=SERVER_OPTIONS)
        return inference_pb2_grpc.InferenceServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def stream(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        request_id: str,
        principal: Principal | None,
        sampling: inference_pb2.SamplingParams | None,
        constraint: inference_pb2.OutputConstraint | None,
    ) -> AsyncGenerator[inference_pb2.GenerateStreamResponse, None]:
        """The answer's pieces as the Inference service streams them; its refusals are raised as they
        are (RpcError). Closing the iterator (or cancelling its task) cancels the call, and the Inference
        service frees the engine slot."""
        request = inference_pb2.GenerateRequest(
            model=model,
            request_id=request_id,
            messages=inference_pb2.Messages(
                messages=[inference_pb2.ChatMessage(role=m.role, content=m.content) for m in messages]
            ),
        )
        if sampling is not None:
            request.sampling.CopyFrom(sampling)
        if constraint is not None:
            request.constraint.CopyFrom(constraint)
        metadata = [(REQUEST_ID_HEADER, request_id), *on_behalf_metadata(self.settings.auth, principal)]
        call = self._stub().GenerateStream(request, metadata=metadata)
        try:
            async for piece in call:
                yield piece
        except grpc.aio.AioRpcError as err:
            raise relay_error(err) from None
        finally:
            call.cancel()
