"""The answer check in the pipeline (pure logic; a stand-in engine writes text that is not JSON, which
the real engine cannot be made to do): a constrained answer that finishes with "stop" and does not
follow its constraint fails the request before its last piece reaches the caller, and is recorded as
failed."""

from __future__ import annotations

from contextlib import aclosing

import grpc
import pytest

from services.common.errors import RpcError
from services.inference.domain import Exchange
from tests.inference.test_pipeline_stages import Deadline, Engine, pipeline, request


async def test_a_json_answer_that_does_not_parse_fails_before_its_end_is_delivered() -> None:
    built, transactions, _ = pipeline(Engine(pieces=3))
    exchange = Exchange("r", request(response_format={"type": "json_object"}))
    delivered: list[str] = []
    with pytest.raises(RpcError) as err:
        async with aclosing(built.stream(exchange, Deadline())) as pieces:
            async for piece in pieces:
                delivered.append(piece.text)
    assert err.value.code == grpc.StatusCode.INTERNAL and err.value.reason == "ENGINE_ERROR"
    assert "does not follow response_format" in err.value.message
    # The last piece (the one with the finish reason) never reached the caller.
    assert delivered == ["t0", "t1"]
    assert transactions.events == [("started", ""), ("finished", "INTERNAL")]


async def test_an_unconstrained_or_grammar_answer_is_not_checked() -> None:
    for body in ({}, {"grammar": {"gbnf": 'root ::= "t0t1t2"'}}):
        built, _, _ = pipeline(Engine(pieces=3))
        outcome = await built.collect(Exchange("r", request(**body)), Deadline())
        assert "".join(outcome.text) == "t0t1t2"
