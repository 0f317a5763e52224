"""A program a ferry user writes with ferry-client, run by test_client_package.py with the Python of a
fresh virtual environment that has only the built wheel (never this repository on its path), and type
checked there with `mypy --strict`. It uses every public service through Envoy and prints a JSON
summary; any failed expectation raises (exit status 1).

Environment: FERRY_TARGET, FERRY_API_KEY (admin), FERRY_LIMITED_KEY (1 request per minute),
FERRY_MODEL, FERRY_INFERENCE_METRICS (the inference process's Prometheus URL).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable

import ferry_client
from ferry.audit.v1 import audit_pb2
from ferry.conversations.v1 import conversations_pb2
from ferry.grammars.v1 import grammars_pb2
from ferry.inference.v1 import inference_pb2
from ferry.jobs.v1 import jobs_pb2
from ferry.keys.v1 import keys_pb2
from ferry.models.v1 import models_pb2
from ferry.openai.v1 import openai_pb2
from ferry.transactions.v1 import transactions_pb2
from ferry_client import errors
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2

MODEL = os.environ.get("FERRY_MODEL", "gemma-3-270m")
summary: dict[str, object] = {}


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def eventually(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def in_flight() -> float:
    text = urllib.request.urlopen(os.environ["FERRY_INFERENCE_METRICS"], timeout=10).read().decode()
    pattern = r'^ferry_inference_requests_in_flight\{[^}]*model="' + re.escape(MODEL) + r'"[^}]*\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


def generation(ferry: ferry_client.Client) -> None:
    short = inference_pb2.SamplingParams(max_tokens=4, temperature=0.0)
    reply = ferry.inference.Generate(
        inference_pb2.GenerateRequest(model=f"models/{MODEL}", prompt="The sky is", sampling=short)
    )
    check(bool(reply.text) and bool(reply.request_id), "Generate answered text under a request id")

    def record_of(request_id: str) -> transactions_pb2.Transaction | None:
        try:
            return ferry.transactions.GetTransaction(
                transactions_pb2.GetTransactionRequest(name=f"transactions/{request_id}")
            )
        except errors.NotFound:  # records are delivered in the background
            return None

    eventually(lambda: record_of(reply.request_id) is not None, "the generation's record")
    record = record_of(reply.request_id)
    assert record is not None
    summary["generate"] = {"request_id": reply.request_id, "record": record.name}

    # A long stream, left after two pieces: ferry cancels the generation and frees the engine slot.
    long = inference_pb2.SamplingParams(max_tokens=400, ignore_eos=True)
    request = inference_pb2.GenerateRequest(model=f"models/{MODEL}", prompt="Once upon a time", sampling=long)
    request_id = ""
    pieces = 0
    for piece in ferry.inference.GenerateStream(request):
        request_id = request_id or piece.request_id
        pieces += 1
        if pieces == 2:
            break
    eventually(lambda: in_flight() == 0, "the in-flight gauge back to 0 after the break")

    def cancelled() -> bool:
        got = record_of(request_id)
        return got is not None and got.status == transactions_pb2.Transaction.Status.STATUS_CANCELLED

    eventually(cancelled, "the stream's record says CANCELLED")
    summary["stream"] = {"pieces": pieces, "request_id": request_id, "in_flight_after": in_flight()}

    # Bad input: a typed error naming the field.
    try:
        ferry.inference.Generate(
            inference_pb2.GenerateRequest(
                model=f"models/{MODEL}", prompt="x", sampling=inference_pb2.SamplingParams(temperature=-1)
            )
        )
        raise AssertionError("a negative temperature was accepted")
    except errors.InvalidArgument as err:
        summary["invalid"] = {"reason": err.reason, "fields": [v.field for v in err.field_violations]}
    try:
        ferry.models.GetModel(models_pb2.GetModelRequest(name="models/no-such-model"))
        raise AssertionError("an unknown model was found")
    except errors.NotFound as err:
        summary["not_found"] = {"reason": err.reason, "code": err.code().name}


def resources(ferry: ferry_client.Client) -> None:
    models = list(
        ferry_client.paginate(
            ferry.models.ListModels, models_pb2.ListModelsRequest(page_size=1), lambda p: p.models
        )
    )
    model = ferry.models.GetModel(models_pb2.GetModelRequest(name=f"models/{MODEL}"))
    summary["models"] = {"listed": [m.name for m in models], "got": model.name}

    records = list(
        itertools.islice(
            ferry_client.paginate(
                ferry.transactions.ListTransactions,
                transactions_pb2.ListTransactionsRequest(page_size=1),
                lambda p: p.transactions,
            ),
            3,
        )
    )
    events = list(
        itertools.islice(
            ferry_client.paginate(
                ferry.audit.ListEvents, audit_pb2.ListEventsRequest(page_size=2), lambda p: p.events
            ),
            5,
        )
    )
    chain = ferry.audit.VerifyChain(audit_pb2.VerifyChainRequest(), timeout=120)
    check(chain.valid, f"the audit chain verifies: {chain.description}")
    summary["records"] = {
        "transactions": len(records),
        "events": len(events),
        "chain_checked": chain.checked_count,
    }

    key = ferry.keys.CreateKey(
        keys_pb2.CreateKeyRequest(key=keys_pb2.Key(display_name="client-test", scopes=["read"]))
    )
    got = ferry.keys.GetKey(keys_pb2.GetKeyRequest(name=key.name))
    listed = [k.name for k in ferry_client.paginate(ferry.keys.ListKeys, keys_pb2.ListKeysRequest(), "keys")]
    revoked = ferry.keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=key.name))
    check(bool(key.secret) and got.name == key.name and key.name in listed, "the new key is listed")
    summary["keys"] = {"created": key.name, "revoked": revoked.HasField("revoke_time")}

    grammar_id = f"yes-no-{uuid.uuid4().hex[:8]}"
    grammar = ferry.grammars.CreateGrammar(
        grammars_pb2.CreateGrammarRequest(
            grammar_id=grammar_id,
            grammar=grammars_pb2.Grammar(
                syntax=grammars_pb2.Grammar.Syntax.SYNTAX_GBNF, definition='root ::= "yes" | "no"'
            ),
        ),
        timeout=60,
    )
    fetched = ferry.grammars.GetGrammar(grammars_pb2.GetGrammarRequest(name=grammar.name))
    names = [
        g.name
        for g in ferry_client.paginate(
            ferry.grammars.ListGrammars, grammars_pb2.ListGrammarsRequest(), lambda p: p.grammars
        )
    ]
    ferry.grammars.DeleteGrammar(grammars_pb2.DeleteGrammarRequest(name=grammar.name))
    check(fetched.definition == grammar.definition and grammar.name in names, "the grammar is stored")
    summary["grammars"] = {"created": grammar.name}


def jobs_and_conversations(ferry: ferry_client.Client) -> None:
    short = inference_pb2.SamplingParams(max_tokens=4, temperature=0.0)
    job = ferry.jobs.CreateJob(
        jobs_pb2.CreateJobRequest(
            job=jobs_pb2.Job(
                request=jobs_pb2.JobRequest(
                    generate=inference_pb2.GenerateRequest(
                        model=f"models/{MODEL}", prompt="Hello", sampling=short
                    )
                )
            )
        )
    )
    done = ferry.jobs.WaitJob(jobs_pb2.WaitJobRequest(name=job.name, timeout_seconds=90), timeout=120)
    check(done.state == jobs_pb2.Job.State.STATE_SUCCEEDED, f"the job succeeded: {done.error_message}")
    summary["jobs"] = {"name": job.name, "state": jobs_pb2.Job.State.Name(done.state)}

    conversation = ferry.conversations.CreateConversation(
        conversations_pb2.CreateConversationRequest(
            conversation=conversations_pb2.Conversation(model=f"models/{MODEL}")
        )
    )
    answer = ferry.conversations.SendMessage(
        conversations_pb2.SendMessageRequest(conversation=conversation.name, content="Hi", sampling=short),
        timeout=120,
    )
    messages = ferry.conversations.ListMessages(
        conversations_pb2.ListMessagesRequest(parent=conversation.name)
    )
    ferry.conversations.DeleteConversation(
        conversations_pb2.DeleteConversationRequest(name=conversation.name)
    )
    summary["conversations"] = {
        "answered": bool(answer.assistant_message.content),
        "messages": len(messages.messages),
    }


def openai_and_health(ferry: ferry_client.Client) -> None:
    listed = ferry.openai.ListModels(openai_pb2.ListModelsRequest())
    completion = ferry.openai.CreateChatCompletion(
        openai_pb2.CreateChatCompletionRequest(
            model=MODEL,
            messages=[
                openai_pb2.ChatCompletionMessage(role="user", content=struct_pb2.Value(string_value="Hi"))
            ],
            max_tokens=4,
        )
    )
    health = ferry.health.Check(health_pb2.HealthCheckRequest())
    summary["openai"] = {"models": len(listed.data), "choices": len(completion.choices)}
    summary["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)


def rate_limited(target: str) -> None:
    # retry=False: see the error itself (with retries on, a delay this long is raised all the same).
    with ferry_client.Client(target, api_key=os.environ["FERRY_LIMITED_KEY"], retry=False) as limited:
        limited.models.ListModels(models_pb2.ListModelsRequest())
        try:
            limited.models.ListModels(models_pb2.ListModelsRequest())
            raise AssertionError("the second request of a 1-per-minute key passed")
        except errors.ResourceExhausted as err:
            summary["rate_limited"] = {"reason": err.reason, "retry_delay": err.retry_delay}


async def asynchronous() -> None:
    async with ferry_client.AsyncClient() as ferry:
        model = await ferry.models.GetModel(models_pb2.GetModelRequest(name=f"models/{MODEL}"))
        request = inference_pb2.GenerateRequest(
            model=f"models/{MODEL}",
            prompt="Far away",
            sampling=inference_pb2.SamplingParams(max_tokens=400, ignore_eos=True),
        )
        pieces = 0
        async with ferry_client.astream(ferry.inference.GenerateStream(request)) as stream:
            async for _piece in stream:
                pieces += 1
                if pieces == 2:
                    break
        listed = [
            m.name
            async for m in ferry_client.apaginate(
                ferry.models.ListModels, models_pb2.ListModelsRequest(), lambda p: p.models
            )
        ]
    eventually(lambda: in_flight() == 0, "the in-flight gauge back to 0 after the async stream")
    summary["async"] = {"model": model.name, "pieces": pieces, "listed": len(listed)}


def main() -> int:
    summary["client"] = ferry_client.__file__
    with ferry_client.Client() as ferry:  # FERRY_TARGET and FERRY_API_KEY
        generation(ferry)
        resources(ferry)
        jobs_and_conversations(ferry)
        openai_and_health(ferry)
        rate_limited(ferry.target)
    asyncio.run(asynchronous())
    json.dump(summary, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
