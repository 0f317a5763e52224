"""A tiny in-process ferry for the client's error paths: InferenceService and ModelsService servicers
whose answers a test scripts (ferry's own rich errors, built by services.common.errors)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from ferry.models.v1 import models_pb2, models_pb2_grpc

from services.common.errors import RpcError

# What a scripted call does: None answers normally, an RpcError is raised as ferry's rich status.
Step = RpcError | None


@dataclass
class Seen:
    """One call as the server saw it."""

    method: str
    metadata: dict[str, str]
    request_id: str
    time_remaining: float | None
    at: float = field(default_factory=time.monotonic)


class Script:
    def __init__(self) -> None:
        self.steps: dict[str, list[Step]] = {}
        self.seen: list[Seen] = []
        self.stream_cancelled = threading.Event()
        self.lock = threading.Lock()

    def plan(self, method: str, *steps: Step) -> None:
        self.steps[method] = list(steps)

    def calls(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    def enter(self, method: str, context: grpc.ServicerContext, request_id: str = "") -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self.lock:
            self.seen.append(Seen(method, metadata, request_id, context.time_remaining()))
            steps = self.steps.get(method) or []
            step = steps.pop(0) if steps else None
        if step is not None:
            status = step.to_status()
            trailers = (*status.trailing_metadata, ("x-request-id", request_id or "fake-request"))
            context.abort_with_status(status._replace(trailing_metadata=trailers))  # type: ignore[attr-defined]


class Inference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> inference_pb2.GenerateResponse:  # type: ignore[override]
        self.script.enter("Generate", context, request.request_id)
        return inference_pb2.GenerateResponse(request_id=request.request_id, model=request.model, text="ok")

    def GenerateStream(  # type: ignore[override]
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        context.add_callback(self.script.stream_cancelled.set)
        self.script.enter("GenerateStream", context, request.request_id)
        for n in range(100_000):
            if n == 2 and self.script.steps.get("GenerateStream:mid"):
                self.script.enter("GenerateStream:mid", context, request.request_id)
            yield inference_pb2.GenerateStreamResponse(request_id=request.request_id, text=f"t{n} ")
            time.sleep(0.01)

    def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> inference_pb2.EmbedResponse:  # type: ignore[override]
        raise NotImplementedError("not in the fake")


class Models(models_pb2_grpc.ModelsServiceServicer):
    NAMES = [f"models/m{i}" for i in range(5)]

    def __init__(self, script: Script) -> None:
        self.script = script

    def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.Model:  # type: ignore[override]
        self.script.enter("GetModel", context)
        return models_pb2.Model(name=request.name)

    def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> models_pb2.ListModelsResponse:  # type: ignore[override]
        self.script.enter("ListModels", context)
        start = int(request.page_token or 0)
        end = start + (request.page_size or 2)
        page = [models_pb2.Model(name=n) for n in self.NAMES[start:end]]
        token = str(end) if end < len(self.NAMES) else ""
        return models_pb2.ListModelsResponse(models=page, next_page_token=token)

    def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.Model:  # type: ignore[override]
        raise NotImplementedError("not in the fake")

    def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.Model:  # type: ignore[override]
        raise NotImplementedError("not in the fake")


def serve(script: Script, tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.Server, str]:
    """Starts the fake on a free port; `tls`: (key PEM, certificate PEM) for a TLS listener on localhost."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(Inference(script), server)
    models_pb2_grpc.add_ModelsServiceServicer_to_server(Models(script), server)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return server, f"127.0.0.1:{port}"
    port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([tls]))
    server.start()
    return server, f"localhost:{port}"


def self_signed() -> tuple[bytes, bytes]:
    """A key and a self-signed certificate for `localhost` (PEM)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
