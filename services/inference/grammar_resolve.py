"""The grammar stage: a request that names a stored grammar (`grammars/{id}`: OpenAI's
`grammar.name`, native `constraint.grammar`) gets that grammar's text as its output constraint, so the
engine only ever sees GBNF or Lark.

The grammar is read from the Grammars service on every such request, with no cache: a grammar deleted
or changed there applies to the next request at once. The read is made on the caller's behalf: the
Principal this service established travels with the service token (as Envoy forwards it, see
services/common/edge.py), so the registry checks the caller's own scope and audits the read as theirs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import grpc
from ferry.auth.v1.auth_pb2 import Principal
from ferry.grammars.v1 import grammars_pb2, grammars_pb2_grpc

from backends.llamacpp.contract import ConstraintKind, OutputConstraint
from services.common.config import Settings
from services.common.context import REQUEST_ID_HEADER, request_id_var
from services.common.edge import on_behalf_metadata
from services.common.errors import Reason, RpcError, relay_error, rpc_error
from services.inference.domain import GenerationRequest

Grammar = grammars_pb2.Grammar
KINDS = {Grammar.Syntax.SYNTAX_GBNF: ConstraintKind.GBNF, Grammar.Syntax.SYNTAX_LARK: ConstraintKind.LARK}
# The registry's refusals, relayed as they are (naming the caller's field); anything else means it
# could not answer.
REFUSALS = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


class Grammars(Protocol):
    async def get(self, name: str, principal: Principal | None) -> Grammar:
        """The stored grammar; raises grpc.aio.AioRpcError as the Grammars service answers."""
        ...


class GrammarsClient:
    """The Grammars service over gRPC."""

    TIMEOUT_SECONDS = 2.0

    def __init__(self, settings: Settings) -> None:
        self.address = settings.grammars.address
        self.auth = settings.auth
        self._stub: grammars_pb2_grpc.GrammarsServiceStub | None = None

    def _client(self) -> grammars_pb2_grpc.GrammarsServiceStub:
        # Created on first use: a grpc.aio channel belongs to the running event loop.
        if self._stub is None:
            self._stub = grammars_pb2_grpc.GrammarsServiceStub(grpc.aio.insecure_channel(self.address))
        return self._stub

    def _metadata(self, principal: Principal | None) -> list[tuple[str, str]]:
        metadata = [(REQUEST_ID_HEADER, request_id_var.get())] if request_id_var.get() else []
        return metadata + on_behalf_metadata(self.auth, principal)

    async def get(self, name: str, principal: Principal | None) -> Grammar:
        request = grammars_pb2.GetGrammarRequest(name=name)
        return await self._client().GetGrammar(  # type: ignore[no-any-return]
            request, metadata=self._metadata(principal), timeout=self.TIMEOUT_SECONDS
        )


class ResolveGrammar:
    def __init__(self, grammars: Grammars | None) -> None:
        self.grammars = grammars

    async def __call__(self, request: GenerationRequest, principal: Principal | None) -> GenerationRequest:
        if not request.grammar_name:
            return request
        field = request.spelling.field("grammar_name")
        grammar = await self._get(request.grammar_name, principal, field)
        kind = KINDS.get(grammar.syntax)
        if kind is None:  # the registry stores only these two
            raise rpc_error(Reason.INTERNAL, f"grammar '{grammar.name}' has an unknown syntax")
        constraint = OutputConstraint(kind=kind, grammar=grammar.definition)
        return replace(request, sampling=request.sampling.model_copy(update={"constraint": constraint}))

    async def _get(self, name: str, principal: Principal | None, field: str) -> Grammar:
        if self.grammars is None:
            raise rpc_error(Reason.GRAMMARS_UNAVAILABLE, f"{field}: no grammar registry is configured")
        try:
            return await self.grammars.get(name, principal)
        except grpc.aio.AioRpcError as err:
            raise _refusal(err, name, field) from None


def _refusal(err: grpc.aio.AioRpcError, name: str, field: str) -> RpcError:
    code = err.code()
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        # A malformed id cannot name a stored grammar either: both are "no such grammar" here.
        description = f"grammar '{name}' not found"
        return rpc_error(
            Reason.GRAMMAR_NOT_FOUND,
            f"{field}: {description}",
            metadata={"field": field, "name": name},
            field_violations=[(field, description)],
        )
    if code in REFUSALS:
        return relay_error(err)
    return rpc_error(
        Reason.GRAMMARS_UNAVAILABLE,
        f"{field}: the grammar registry did not answer ({code.name}); retry shortly",
        metadata={"field": field},
    )
