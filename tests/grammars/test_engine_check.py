"""Nothing unchecked is stored: while Triton cannot be reached, a create is UNAVAILABLE (retryable) and
the store is never written. Triton here is a port nobody listens on (a real refused connection); the
store is a stand-in that records writes (an error path)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from ferry.grammars.v1 import grammars_pb2

from launcher.ports import free_ports
from services.common.config import TritonSettings
from services.common.errors import RpcError
from services.grammars.domain import GrammarFields, Syntax
from services.grammars.engine_check import EngineCheck
from services.grammars.servicer import GrammarsServicer

Grammar = grammars_pb2.Grammar


class Store:
    def __init__(self) -> None:
        self.writes: list[Any] = []

    async def by_request_id(self, request_id: str) -> None:
        return None

    async def by_id(self, grammar_id: str) -> None:
        return None

    async def insert(self, *args: Any, **kwargs: Any) -> None:
        self.writes.append(args)


class Recorder:
    def operational(self, *args: Any, **kwargs: Any) -> str:
        raise AssertionError("nothing changed, so nothing is audited")


def _down() -> EngineCheck:
    (port,) = free_ports(1)
    return EngineCheck(TritonSettings(grpc_port=port))


async def test_the_check_is_unavailable_while_triton_is_down() -> None:
    with pytest.raises(RpcError) as err:
        await _down()(GrammarFields("", "", Syntax.GBNF, 'root ::= "a"'), "grammar.definition")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.reason == "TRITON_UNAVAILABLE"
    assert err.value.retry_after_seconds is not None and "nothing was stored" in err.value.message


async def test_a_create_while_triton_is_down_stores_nothing() -> None:
    store = Store()
    servicer = GrammarsServicer(store, _down(), Recorder())  # type: ignore[arg-type]
    request = grammars_pb2.CreateGrammarRequest(
        grammar_id="down", grammar=Grammar(syntax=Grammar.Syntax.SYNTAX_GBNF, definition='root ::= "a"')
    )
    with pytest.raises(RpcError) as err:
        await servicer.CreateGrammar(request, None)  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert store.writes == []
