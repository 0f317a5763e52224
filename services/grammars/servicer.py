"""GrammarsService: create, get, list, update and delete stored grammars (AIP-131..135, etags per
AIP-154, idempotent create per AIP-155). Every change is compiled by the engine first and audited."""

from __future__ import annotations

import grpc
from ferry.grammars.v1 import grammars_pb2, grammars_pb2_grpc
from google.protobuf import empty_pb2

from services.common import listing
from services.common.errors import Reason, invalid_argument, rpc_error
from services.common.interceptor import current_call
from services.common.names import (
    GRAMMAR_ID,
    GRAMMAR_ID_RULE,
    GRAMMARS,
    REQUEST_ID_RULE,
    is_request_id,
    resource_id,
)
from services.grammars.domain import GrammarFields, StoredGrammar, update_paths
from services.grammars.engine_check import EngineCheck
from services.grammars.store import GrammarStore, new_grammar_id
from services.recording import Recorder

Grammar = grammars_pb2.Grammar


class GrammarsServicer(grammars_pb2_grpc.GrammarsServiceServicer):
    def __init__(self, store: GrammarStore, check: EngineCheck, recorder: Recorder) -> None:
        self.store = store
        self.check = check
        self.recorder = recorder

    async def CreateGrammar(
        self, request: grammars_pb2.CreateGrammarRequest, context: grpc.aio.ServicerContext
    ) -> Grammar:
        if not request.HasField("grammar"):
            raise invalid_argument("grammar", "is required")
        if request.request_id and not is_request_id(request.request_id):
            raise invalid_argument("request_id", f"must be {REQUEST_ID_RULE}")
        if request.grammar_id and not GRAMMAR_ID.match(request.grammar_id):
            raise invalid_argument("grammar_id", f"must be {GRAMMAR_ID_RULE}")
        fields = GrammarFields.from_proto(request.grammar)
        request_id = request.request_id or None
        if request_id and (first := await self.store.by_request_id(request_id)) is not None:
            return first.to_proto()  # a retry: the first answer (AIP-155)
        grammar_id = request.grammar_id or new_grammar_id()
        if await self.store.by_id(grammar_id) is not None:
            raise _exists(grammar_id)  # before the engine's time is spent on it
        await self.check(fields, "grammar.definition")
        principal, call_id = _caller()
        created = await self.store.insert(grammar_id, fields, creator=principal, request_id=request_id)
        if created is None:  # lost a race: to the same request's retry, or to another create of the id
            first = await self.store.by_request_id(request_id) if request_id else None
            if first is None:
                raise _exists(grammar_id)
            return first.to_proto()
        self._audit("grammar.create", created, principal, call_id, syntax=fields.syntax.value)
        return created.to_proto()

    async def GetGrammar(
        self, request: grammars_pb2.GetGrammarRequest, context: grpc.aio.ServicerContext
    ) -> Grammar:
        return (await self._stored(request.name, "name")).to_proto()

    async def ListGrammars(
        self, request: grammars_pb2.ListGrammarsRequest, context: grpc.aio.ServicerContext
    ) -> grammars_pb2.ListGrammarsResponse:
        page = listing.page(request.page_size, request.page_token, query=(GRAMMARS,), key=("text",))
        grammars = await self.store.page(page.after, page.limit)
        shown, token = page.split(grammars, lambda g: (g.id,))
        return grammars_pb2.ListGrammarsResponse(
            grammars=[g.to_proto() for g in shown], next_page_token=token
        )

    async def UpdateGrammar(
        self, request: grammars_pb2.UpdateGrammarRequest, context: grpc.aio.ServicerContext
    ) -> Grammar:
        if not request.HasField("grammar"):
            raise invalid_argument("grammar", "is required")
        paths = update_paths(list(request.update_mask.paths))
        current = await self._stored(request.grammar.name, "grammar.name")
        _check_etag(current, request.grammar.etag)
        fields = current.fields.updated(request.grammar, paths)
        if (fields.syntax, fields.definition) != (current.fields.syntax, current.fields.definition):
            await self.check(fields, "grammar.definition")
        updated = await self.store.update(current.id, current.etag, fields)
        if updated is None:  # changed or deleted while the engine checked it
            latest = await self._stored(request.grammar.name, "grammar.name")
            raise _stale(latest, "it changed while this update was checked; read it again")
        principal, call_id = _caller()
        self._audit("grammar.update", updated, principal, call_id, fields=",".join(paths))
        return updated.to_proto()

    async def DeleteGrammar(
        self, request: grammars_pb2.DeleteGrammarRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        current = await self._stored(request.name, "name")
        _check_etag(current, request.etag)
        if not await self.store.delete(current.id, request.etag or None):
            latest = await self._stored(request.name, "name")
            raise _stale(latest, "it changed since it was read")
        principal, call_id = _caller()
        self._audit("grammar.delete", current, principal, call_id)
        return empty_pb2.Empty()

    async def _stored(self, name: str, field: str) -> StoredGrammar:
        grammar = await self.store.by_id(resource_id(name, GRAMMARS, GRAMMAR_ID, field))
        if grammar is None:
            raise rpc_error(Reason.GRAMMAR_NOT_FOUND, f"grammar '{name}' not found", metadata={"name": name})
        return grammar

    def _audit(
        self, action: str, grammar: StoredGrammar, principal: str, request_id: str, **attributes: str
    ) -> None:
        self.recorder.operational(
            action,
            principal=principal,
            resource=grammar.name,
            request_id=request_id,
            attributes={"etag": grammar.etag, **attributes},
        )


def _caller() -> tuple[str, str]:
    """(principal, request id) of the RPC being handled."""
    call = current_call.get()
    return (call.principal, call.request_id) if call else ("system", "")


def _check_etag(grammar: StoredGrammar, etag: str) -> None:
    if etag and etag != grammar.etag:
        raise _stale(grammar, "the etag sent is not its current one; read it again")


def _stale(grammar: StoredGrammar, why: str) -> Exception:
    return rpc_error(
        Reason.ETAG_MISMATCH,
        f"grammar '{grammar.name}' was not changed: {why}",
        metadata={"name": grammar.name, "etag": grammar.etag},
    )


def _exists(grammar_id: str) -> Exception:
    name = f"{GRAMMARS}/{grammar_id}"
    return rpc_error(
        Reason.GRAMMAR_ALREADY_EXISTS, f"grammar '{name}' already exists", metadata={"name": name}
    )
