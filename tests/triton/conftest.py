"""A real tritonserver with the real models (Gemma 3 and SmolLM2), started once per session for the tests
in this folder.

It is launched exactly as `make run` launches it (`launcher.triton.triton_program`), on free ports.
Set FERRY_TEST_TRITON_GRPC=host:port to test a Triton that is already running instead.
`start_triton` also starts private Tritons over other model repositories (tests that stop their Triton).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from launcher.ports import free_ports
from launcher.setup import ensure_backend, ensure_model
from launcher.triton import cleanup_shm, triton_program
from services.common.config import REPO_ROOT, Settings, TritonSettings

MODEL = "gemma-3-270m"
SMOLLM2 = "smollm2-135m-instruct"
# The models of the session's Triton: every model the repository ships.
SESSION_MODELS = (MODEL, SMOLLM2)
READY_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class TritonServer:
    grpc_target: str
    # Model parameters as Triton's model-config API reports them (what the services read).
    parameters: dict[str, str]
    # Triton's Prometheus endpoint; None for an external Triton.
    metrics_url: str | None = None

    @property
    def n_parallel(self) -> int:
        return int(self.parameters["n_parallel"])

    @property
    def context_length(self) -> int:
        return int(self.parameters["context_length"])


@dataclass(frozen=True)
class RunningTriton:
    process: subprocess.Popen[bytes]
    grpc_target: str
    metrics_url: str
    log: Path
    # Parameters of each loaded model, by name.
    parameters: dict[str, dict[str, str]]

    def server(self, model: str = MODEL) -> TritonServer:
        return TritonServer(self.grpc_target, self.parameters[model], self.metrics_url)


def _wait_ready(
    target: str, models: list[str], process: subprocess.Popen[bytes] | None, log: Path | None
) -> dict[str, dict[str, str]]:
    client = grpcclient.InferenceServerClient(target)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    try:
        while True:
            if process is not None and process.poll() is not None:
                tail = log.read_text()[-4000:] if log else ""
                raise RuntimeError(f"tritonserver exited with {process.returncode}:\n{tail}")
            try:
                if all(client.is_model_ready(model) for model in models):
                    configs = {
                        model: client.get_model_config(model, as_json=True)["config"] for model in models
                    }
                    return {
                        model: {key: value["string_value"] for key, value in config["parameters"].items()}
                        for model, config in configs.items()
                    }
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{models} not ready on {target} after {READY_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.25)
    finally:
        client.close()


@contextmanager
def start_triton(
    repository: Path = REPO_ROOT / "triton_models", models: tuple[str, ...] = (MODEL,)
) -> Iterator[RunningTriton]:
    """A private tritonserver over `repository` with `models` loaded; stopped (if still running) on exit."""
    home = Settings()  # the repository's FERRY_HOME, where `make setup` assembled the model
    ensure_model(home)
    ensure_backend()
    grpc_port, http_port, metrics_port = free_ports(3)
    settings = Settings(
        home=home.home,
        triton=TritonSettings(
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
            repository=repository,
            load_models=list(models),
        ),
    )
    program = triton_program(settings)
    log = Path(tempfile.mkstemp(prefix="ferry-triton-", suffix=".log")[1])
    with log.open("wb") as output:
        process = subprocess.Popen(
            program.argv,
            env={**os.environ, **program.env},
            cwd=program.cwd,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        parameters = _wait_ready(settings.triton.grpc_address, list(models), process, log)
        yield RunningTriton(
            process,
            settings.triton.grpc_address,
            f"http://{settings.triton.host}:{metrics_port}/metrics",
            log,
            parameters,
        )
    finally:
        process.terminate()
        try:
            process.wait(program.stop_wait_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        cleanup_shm(settings)
    log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tritons() -> Iterator[dict[str, TritonServer]]:
    """The session's Triton, as one TritonServer per loaded model."""
    external = os.environ.get("FERRY_TEST_TRITON_GRPC")
    if external:
        parameters = _wait_ready(external, list(SESSION_MODELS), None, None)
        yield {model: TritonServer(external, parameters[model]) for model in SESSION_MODELS}
        return
    with start_triton(models=SESSION_MODELS) as running:
        yield {model: running.server(model) for model in SESSION_MODELS}


@pytest.fixture(scope="session")
def triton(tritons: dict[str, TritonServer]) -> TritonServer:
    return tritons[MODEL]


@pytest.fixture(scope="session")
def smollm2(tritons: dict[str, TritonServer]) -> TritonServer:
    return tritons[SMOLLM2]
