"""How ferry launches the real `tritonserver` binary that ships in the nvidia-pytriton wheel (see RUNTIME.md)."""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

from launcher.environment import foreign_argv
from launcher.programs import Program
from services.common.config import REPO_ROOT, Settings
from services.common.triton_client import ACCESS_HEADER

SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def _pytriton_dir() -> Path:
    # Located without importing pytriton (its import pulls in numpy and more).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return SITE_PACKAGES / "pytriton" / "tritonserver"
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


PYTRITON_DIR = _pytriton_dir()
TRITONSERVER = PYTRITON_DIR / "bin" / "tritonserver"
CACHE_DIR = PYTRITON_DIR / "caches"
PYTRITON_LIBS = PYTRITON_DIR.parents[1] / "nvidia_pytriton.libs"
# Built by `python -m launcher.setup`: the Python backend (library, stub) and the python-based llamacpp
# backend (backends/llamacpp/model.py) that every model in triton_models/ names.
BACKEND_DIR = REPO_ROOT / "build" / "triton" / "backends"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"


def shm_prefix(settings: Settings) -> str:
    """Name prefix of this Triton's shared-memory regions.

    Triton's default prefix is shared by every instance on the host; one that carries the gRPC port
    (unique among running Tritons) lets `cleanup_shm` remove this instance's leftovers and nobody else's.
    """
    return f"{SHM_PREFIX}ferry{settings.triton.grpc_port}_"


def _libpython_dir() -> Path | None:
    # pyenv builds libpython shared; the stub must load the same one the venv's interpreter uses.
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlibrary = sysconfig.get_config_var("INSTSONAME") or "libpython3.11.so.1.0"
    if libdir and (Path(libdir) / ldlibrary).exists():
        return Path(libdir)
    return None


def triton_env(settings: Settings) -> dict[str, str]:
    library_path = [str(PYTRITON_LIBS)]
    libpython = _libpython_dir()
    if libpython is not None:
        library_path.append(str(libpython))
    if os.environ.get("LD_LIBRARY_PATH"):
        library_path.append(os.environ["LD_LIBRARY_PATH"])
    # The stub finds its interpreter as `python3` on PATH, so the venv's bin/ goes first.
    venv_bin = Path(sys.prefix) / "bin"
    return {
        "LD_LIBRARY_PATH": os.pathsep.join(library_path),
        "PATH": os.pathsep.join([str(venv_bin), os.environ.get("PATH", "/usr/bin:/bin")]),
        # The llamacpp backend finds assembled GGUF files under $FERRY_HOME/models.
        "FERRY_HOME": str(settings.home),
    }


def triton_argv(settings: Settings) -> list[str]:
    triton = settings.triton
    argv = [
        str(TRITONSERVER),
        f"--model-repository={triton.repository}",
        f"--backend-directory={BACKEND_DIR}",
        f"--cache-directory={CACHE_DIR}",
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in triton.load_models),
        f"--grpc-port={triton.grpc_port}",
        f"--http-port={triton.http_port}",
        f"--metrics-port={triton.metrics_port}",
        # Bind to the configured host only (loopback by default).
        f"--grpc-address={triton.host}",
        f"--http-address={triton.host}",
        f"--metrics-address={triton.host}",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        "--exit-timeout-secs=5",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix(settings)}",
        "--log-verbose=0",
        *restricted_flags(settings),
        *triton_tracing_flags(settings),
    ]
    return argv


# Every protocol Triton has but health: inference, model metadata and configuration, the repository
# (index, load, unload), statistics, shared-memory registration, trace and log settings answer only a
# caller that shows the access secret. Health (live, ready, model ready, grpc.health.v1) stays open for
# probes: Kubernetes and Docker ask /v2/health/*, and the llamacpp backend's shutdown monitor asks
# /v2/health/live over HTTP (backends/llamacpp/shutdown.py) -- which is why HTTP stays on, on the
# configured host only.
RESTRICTED_PROTOCOLS = (
    "inference",
    "metadata",
    "model-config",
    "model-repository",
    "statistics",
    "shared-memory",
    "trace",
    "logging",
)


def restricted_flags(settings: Settings) -> list[str]:
    """Triton's restricted protocol (gRPC) and API (HTTP) flags keyed by `triton.access_secret`; none
    when it is unset (a Triton started by tests on its own)."""
    secret = settings.triton.access_secret
    if secret is None:
        return []
    rule = f"{','.join(RESTRICTED_PROTOCOLS)}:{ACCESS_HEADER}={secret.get_secret_value()}"
    return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]


def triton_tracing_flags(settings: Settings) -> list[str]:
    """Triton's own OpenTelemetry tracing, when tracing is on and an OTLP/HTTP endpoint is set (the
    only exporter this Triton has): spans for each request it serves, continuing the W3C trace context
    the Inference service sends with the call. Triton samples on its own (`rate`: 1 of N requests): at
    ratio 1.0 it traces all; otherwise about the same share, not the same requests as Envoy."""
    telemetry = settings.telemetry
    if not telemetry.enabled or not telemetry.triton_otlp_http_endpoint:
        return []
    rate = max(1, round(1 / telemetry.sampling_ratio)) if telemetry.sampling_ratio > 0 else 0
    if rate == 0:
        return []
    return [
        "--trace-config=mode=opentelemetry",
        "--trace-config=level=TIMESTAMPS",
        f"--trace-config=rate={rate}",
        "--trace-config=count=-1",
        f"--trace-config=opentelemetry,url={telemetry.triton_otlp_http_endpoint}",
        "--trace-config=opentelemetry,resource=service.name=ferry-triton",
        f"--trace-config=opentelemetry,resource=service.namespace={telemetry.service_namespace}",
    ]


# The only FERRY_* variable Triton's backends read (backends/llamacpp/config.py, backends/onnx): the
# home where model files are. The rest of ferry's environment (the service token, NATS and database
# passwords, this Triton's own access secret, which it takes from its command line) stays out of Triton
# and its Python backend stubs, as deploy/docker/triton-entrypoint.sh does in containers.
TRITON_KEEPS = ("FERRY_HOME",)


def triton_program(settings: Settings) -> Program:
    return Program(
        name="triton",
        argv=foreign_argv(triton_argv(settings), keep=TRITON_KEEPS),
        env=triton_env(settings),
        cwd=REPO_ROOT,
        priority=100,
        # tritonserver waits --exit-timeout-secs for in-flight requests, then stops its stubs.
        stop_wait_seconds=15,
    )


def _mapped_shm_files() -> set[str]:
    """Shared-memory files some live process still maps (so they are not leftovers)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if "/dev/shm/" in line:
                mapped.add(line.rsplit(None, 1)[-1].removesuffix(" (deleted)"))
    return mapped


def cleanup_shm(settings: Settings) -> list[Path]:
    """Remove this Triton's leftover /dev/shm regions (a forced exit leaves them); returns what was removed.

    Only files with this instance's prefix (see `shm_prefix`) that no live process maps are removed,
    so a Triton still running on the same port, or another helper's Triton, is never disturbed.
    """
    candidates = sorted(SHM_DIR.glob(f"{shm_prefix(settings)}*"))
    if not candidates:
        return []
    in_use = _mapped_shm_files()
    removed = []
    for path in candidates:
        if str(path) in in_use:
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
