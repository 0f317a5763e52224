"""A user's calls through connections that drop, run by test_client_package.py with the Python of the
fresh virtual environment (only the built wheel). Each call goes through its own forwarder
(lossy_proxy.py) that passes the first try to ferry and then drops the connection before the answer
arrives: the client's retry (gRPC's, on UNAVAILABLE) must answer, and the generation, retried under
the request id the client gave it, must leave one transaction record. Prints a JSON summary; a failed
expectation raises.

Environment: FERRY_TARGET (Envoy), FERRY_API_KEY (admin), FERRY_MODEL, FERRY_LOSSY_READ and
FERRY_LOSSY_GENERATE (the two forwarders' targets).
"""

from __future__ import annotations

import json
import os
import sys
import time

import ferry_client
from ferry.inference.v1 import inference_pb2
from ferry.models.v1 import models_pb2
from ferry.transactions.v1 import transactions_pb2
from ferry_client import errors

MODEL = os.environ.get("FERRY_MODEL", "gemma-3-270m")
SUCCEEDED = transactions_pb2.Transaction.Status.STATUS_SUCCEEDED


def record(ferry: ferry_client.Client, request_id: str) -> transactions_pb2.Transaction | None:
    try:
        return ferry.transactions.GetTransaction(
            transactions_pb2.GetTransactionRequest(name=f"transactions/{request_id}")
        )
    except errors.NotFound:  # records are delivered in the background
        return None


def main() -> int:
    summary: dict[str, object] = {"client": ferry_client.__file__}
    # An idempotent read: retried by the channel's service config.
    with ferry_client.Client(os.environ["FERRY_LOSSY_READ"], timeout=60) as lossy:
        listed = lossy.models.ListModels(models_pb2.ListModelsRequest())
    summary["read"] = {"models": [m.name for m in listed.models]}

    # A generation without a request id of its own: the client gives it one, so its retry is the same
    # request to ferry.
    with ferry_client.Client(os.environ["FERRY_LOSSY_GENERATE"], timeout=120) as lossy:
        reply = lossy.inference.Generate(
            inference_pb2.GenerateRequest(
                model=f"models/{MODEL}",
                prompt="The sky is",
                sampling=inference_pb2.SamplingParams(max_tokens=4, temperature=0.0),
            )
        )
    if not (reply.text and reply.request_id):
        raise AssertionError(f"the retried generation answered nothing: {reply}")

    with ferry_client.Client() as ferry:  # straight to Envoy
        deadline = time.monotonic() + 60
        while (got := record(ferry, reply.request_id)) is None or got.status != SUCCEEDED:
            if time.monotonic() > deadline:
                raise AssertionError(f"no SUCCEEDED record of {reply.request_id} within 60 s: {got}")
            time.sleep(0.2)
        found = ferry.transactions.ListTransactions(
            transactions_pb2.ListTransactionsRequest(filter=f'request_id = "{reply.request_id}"')
        )
    summary["generate"] = {
        "request_id": reply.request_id,
        "records": len(found.transactions),
        "status": transactions_pb2.Transaction.Status.Name(got.status),
    }
    json.dump(summary, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
