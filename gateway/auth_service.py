"""AuthService (internal): the decision every other service asks for, answered by LocalAuthorizer."""

from __future__ import annotations

import grpc
from ferry.auth.v1 import auth_pb2, auth_pb2_grpc

from gateway.authorizer import LocalAuthorizer
from services.common.errors import invalid_argument


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, authorizer: LocalAuthorizer) -> None:
        self.authorizer = authorizer

    async def Authorize(
        self, request: auth_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthorizeResponse:
        if not request.method.startswith("/"):
            raise invalid_argument("method", "must be the full gRPC method, /package.Service/Method")
        return auth_pb2.AuthorizeResponse(principal=await self.authorizer.authorize(request))

    async def RecordUsage(
        self, request: auth_pb2.RecordUsageRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RecordUsageResponse:
        if not request.principal:
            raise invalid_argument("principal", "is required")
        if request.completion_tokens < 0:
            raise invalid_argument("completion_tokens", "must not be negative")
        await self.authorizer.record_usage(request)
        return auth_pb2.RecordUsageResponse()
