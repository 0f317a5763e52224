"""One trace per request across Envoy, the gateway, the Inference service and Triton, with the record
deliveries linked to it; and trace exemplars on the latency histograms. A stack of its own with
tracing on (telemetry.exporter=otlp) exports to a real OTLP receiver in this process."""

from __future__ import annotations

import secrets
import subprocess

import httpx
import pytest
from ferry.inference.v1 import inference_pb2 as pb
from ferry.inference.v1 import inference_pb2_grpc
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tests.deploy.tools import promtool
from tests.observability.collector import Collector, ReceivedSpan
from tests.observability.conftest import MODEL
from tests.stack import RunningStack

pytestmark = pytest.mark.stack

SERVER, CLIENT, PRODUCER = 2, 3, 4  # OTLP span kinds
# Envoy's exporter flushes every 5 s; the services' every 200 ms here.
EXPORT_WAIT_SECONDS = 60.0
# Trace ids of the requests sent so far, for the exemplar test: sampled and not.
TRACES: set[str] = set()
UNSAMPLED: set[str] = set()


def new_traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def one(spans: list[ReceivedSpan], what: str, **match: object) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"{what}: expected one span matching {match}, got {found} among {spans}"
    return found[0]


def exported(collector: Collector, trace_id: str) -> bool:
    """Whether the spans of a generation in `trace_id` have arrived from Envoy, Triton and the
    deliveries (the last exporters to send theirs)."""
    names = {(s.service, s.name) for s in collector.in_trace(trace_id)}
    linked = {s.name for s in collector.linked_to(trace_id)}
    return (
        ("ferry-envoy", "ingress") in names
        and ("ferry-triton", "InferRequest") in names
        and {"deliver transactions", "deliver audit"} <= linked
    )


def assert_request_trace(
    collector: Collector, trace_id: str, client_span: str, method: str, request_id: str, secrets_: list[str]
) -> None:
    """The span tree of one generation: Envoy → gateway check; Envoy → inference → Triton call →
    Triton's own spans; and the deliveries of its transaction and audit records linked to it."""

    collector.wait_until(lambda: exported(collector, trace_id), EXPORT_WAIT_SECONDS)
    spans = collector.in_trace(trace_id)

    # Envoy continues the client's trace (its traceparent), checks the key, routes to Inference. (The
    # first call of a method with a key is checked; the next ones ride its edge lease, without these
    # two spans: gateway/edge_lease.py. Each test here calls its method once.)
    ingress = one(spans, "Envoy's server span", service="ferry-envoy", name="ingress")
    assert ingress.parent_id == client_span and ingress.kind == SERVER
    authz = one(
        spans,
        "Envoy's ext_authz call",
        service="ferry-envoy",
        parent_id=ingress.span_id,
        kind=CLIENT,
        name="async envoy.service.auth.v3.Authorization.Check egress",
    )
    check = one(spans, "the gateway's key check", service="ferry-gateway", parent_id=authz.span_id)
    assert check.name == "/envoy.service.auth.v3.Authorization/Check" and check.kind == SERVER
    assert check.attributes["ferry.auth.decision"] == "allow"
    assert check.attributes["ferry.auth.checked_method"] == method
    # Generations go to the generation cluster (launcher/envoy.py GENERATION_CLUSTER).
    upstream = one(
        spans, "Envoy's call to Inference", service="ferry-envoy", name="router inference_generation egress"
    )
    assert upstream.parent_id == ingress.span_id

    # The Inference service's server span, and its CLIENT span for the call to Triton.
    server = one(spans, "the Inference server span", service="ferry-inference", parent_id=upstream.span_id)
    assert server.name == method and server.kind == SERVER
    assert server.attributes["ferry.request_id"] == request_id
    assert server.attributes["gen_ai.request.model"] == MODEL
    call = one(spans, "the call to Triton", service="ferry-inference", parent_id=server.span_id, kind=CLIENT)
    assert call.name.endswith(f" {MODEL}")
    assert call.attributes["rpc.method"] == "ModelStreamInfer"
    assert call.attributes["gen_ai.request.model"] == MODEL
    assert call.attributes["gen_ai.usage.output_tokens"] == 3
    assert call.attributes["gen_ai.usage.input_tokens"] > 0
    assert call.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert call.events == ["ferry.admitted", "gen_ai.first_token"]

    # Triton's own spans continue the call's context: request → model → compute.
    infer = one(spans, "Triton's request span", service="ferry-triton", name="InferRequest")
    assert infer.parent_id == call.span_id
    model = one(spans, "Triton's model span", service="ferry-triton", name=MODEL)
    assert model.parent_id == infer.span_id and "QUEUE_START" in model.events
    compute = one(spans, "Triton's compute span", service="ferry-triton", name="compute")
    assert compute.parent_id == model.span_id and "COMPUTE_START" in compute.events

    # Record deliveries: spans of their own traces, linked to the request's server span.
    linked = collector.linked_to(trace_id)
    transaction = [s for s in linked if s.name == "deliver transactions" and s.service == "ferry-inference"]
    assert transaction and all(s.kind == PRODUCER for s in transaction)
    assert transaction[0].links == [(trace_id, server.span_id)]
    assert transaction[0].attributes["ferry.request_id"] == request_id
    audit = [s for s in linked if s.name == "deliver audit" and s.service == "ferry-inference"]
    assert audit and (trace_id, server.span_id) in audit[0].links

    # The Transactions service's span of the write is a child of a delivery (its exporter may send it
    # after the Inference service sent the delivery's: waited for, as the others above).
    def written() -> bool:
        return any(
            s.service == "ferry-transactions" and s.parent_id == delivery.span_id
            for delivery in transaction
            for s in collector.in_trace(delivery.trace_id)
        )

    collector.wait_until(written, EXPORT_WAIT_SECONDS)
    assert written(), [collector.in_trace(delivery.trace_id) for delivery in transaction]

    # Content capture is off: no prompt, no generated text and no key in any attribute.
    everything = " ".join(str(v) for s in [*spans, *linked] for v in s.attributes.values())
    for secret in secrets_:
        assert secret not in everything


def test_rest_completion_is_one_trace(traced: RunningStack, collector: Collector) -> None:
    trace_id, parent, traceparent = new_traceparent()
    prompt = f"Tracing prompt {secrets.token_hex(4)}"
    with traced.http() as http:
        reply = http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0},
            headers={"traceparent": traceparent},
        )
    assert reply.status_code == 200, reply.text
    TRACES.add(trace_id)
    assert_request_trace(
        collector,
        trace_id,
        parent,
        "/ferry.openai.v1.OpenAIService/CreateCompletion",
        reply.headers["x-request-id"],
        [prompt, traced.admin_key],
    )


def test_native_grpc_generation_is_one_trace(traced: RunningStack, collector: Collector) -> None:
    trace_id, parent, traceparent = new_traceparent()
    prompt = f"Tracing prompt {secrets.token_hex(4)}"
    native = inference_pb2_grpc.InferenceServiceStub(traced.channel())
    request_id = f"trace-test-{secrets.token_hex(4)}"
    pieces = list(
        native.GenerateStream(
            pb.GenerateRequest(
                model=f"models/{MODEL}",
                request_id=request_id,
                prompt=prompt,
                sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True),
            ),
            metadata=[("traceparent", traceparent)],
            timeout=60,
        )
    )
    assert sum(p.token_count for p in pieces) == 3
    TRACES.add(trace_id)
    assert_request_trace(
        collector,
        trace_id,
        parent,
        "/ferry.inference.v1.InferenceService/GenerateStream",
        request_id,
        [prompt, traced.admin_key],
    )


def test_a_client_trace_not_sampled_stays_unrecorded(traced: RunningStack, collector: Collector) -> None:
    """Sampling is parent-based: a `traceparent` with the sampled flag off is honoured by Envoy, every
    service and the deliveries (nothing of theirs is exported or linked). Triton does not honour the
    flag (it samples by its own `rate`), so its own spans are the only ones of that trace."""
    unsampled, _, _ = new_traceparent()
    sampled, _, traceparent = new_traceparent()
    UNSAMPLED.add(unsampled)
    TRACES.add(sampled)
    with traced.http() as http:
        for header in (f"00-{unsampled}-{secrets.token_hex(8)}-00", traceparent):
            reply = http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 3},
                headers={"traceparent": header},
            )
            assert reply.status_code == 200, reply.text
    # Exporters send in order: once the later, sampled request is all there, the first would be too.
    assert collector.wait_until(lambda: exported(collector, sampled), EXPORT_WAIT_SECONDS)
    assert {s.service for s in collector.in_trace(unsampled)} <= {"ferry-triton"}
    assert collector.linked_to(unsampled) == []


def test_latency_histograms_carry_trace_exemplars(traced: RunningStack) -> None:
    if not TRACES:
        pytest.skip("needs the traced requests of the tests above (run the module, not this test alone)")
    url = traced.metrics_urls["inference"]
    openmetrics = httpx.get(url, headers={"accept": "application/openmetrics-text"}, timeout=10)
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = {
        family.name: {s.exemplar.labels["trace_id"] for s in family.samples if s.exemplar}
        for family in text_string_to_metric_families(openmetrics.text)
    }
    for histogram in (
        "ferry_inference_time_to_first_token_seconds",
        "ferry_inference_e2e_request_latency_seconds",
        "ferry_grpc_server_handling_seconds",
    ):
        # The latest observation of each bucket: one of the sampled requests, never the unsampled one.
        assert exemplars[histogram] & TRACES, (histogram, exemplars[histogram])
        assert not exemplars[histogram] & UNSAMPLED
    # Prometheus' classic text format (no exemplars in it) still passes promtool's lint.
    text = httpx.get(url, timeout=10).text
    lint = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
