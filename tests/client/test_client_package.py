"""ferry-client as users get it: the package is built (sdist, then the wheel from the sdist, as
`uv build` does), installed into a fresh virtual environment outside the repository, and a user's
program (user_program.py) is type checked there with `mypy --strict` and run against the stack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.lossy_proxy import LossyProxy
from tests.stack import RunningStack

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"
PROGRAM = Path(__file__).with_name("user_program.py")
RETRY_PROGRAM = Path(__file__).with_name("retry_program.py")


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv[:3]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of this repository's paths or settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FERRY_", "VIRTUAL_ENV", "MYPY"))
    }
    return {**env, **extra}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with only the built ferry-client wheel (and mypy with the `typing` extra)."""
    if not UV.exists():
        pytest.skip(f"uv is not installed beside {sys.executable} (make install puts it there)")
    top = tmp_path_factory.mktemp("ferry-client")
    dist = top / "dist"
    run([str(UV), "build", "--quiet", "--out-dir", str(dist), str(REPO / "clients/python")], cwd=top)
    wheels = list(dist.glob("ferry_client-*.whl"))
    assert len(wheels) == 1 and list(dist.glob("ferry_client-*.tar.gz")), sorted(dist.iterdir())
    venv = top / "venv"
    run([str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)], cwd=top, env=clean_env())
    python = venv / "bin/python"
    run(
        [
            str(UV),
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            f"{wheels[0]}[typing]",
            "mypy==2.4.1",
        ],
        cwd=top,
        env=clean_env(),
    )
    shutil.copy(PROGRAM, top / "program.py")
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_the_wheel_carries_the_generated_stubs_and_their_types(client_venv: Path) -> None:
    python = client_venv / "venv/bin/python"
    found = run(
        [
            str(python),
            "-c",
            "import ferry, ferry_client, ferry.inference.v1.inference_pb2_grpc as g; "
            "import pathlib; print(pathlib.Path(ferry.__file__).parent, pathlib.Path(g.__file__).with_suffix('.pyi').exists())",
        ],
        cwd=client_venv,
        env=clean_env(),
    ).split()
    assert found[0].startswith(str(client_venv / "venv")) and found[1] == "True"


def test_mypy_strict_passes_on_a_program_using_the_client(client_venv: Path) -> None:
    out = run(
        [str(client_venv / "venv/bin/mypy"), "--strict", "--no-incremental", "program.py"],
        cwd=client_venv,
        env=clean_env(),
    )
    assert "Success" in out


def test_a_users_program_uses_every_service(client_venv: Path, stack: RunningStack) -> None:
    limited = stack.create_key(["read"], requests_per_minute=1)
    env = clean_env(
        FERRY_TARGET=stack.grpc_target,
        FERRY_API_KEY=stack.admin_key,
        FERRY_LIMITED_KEY=limited,
        FERRY_MODEL=stack.settings.triton.default_model,
        FERRY_INFERENCE_METRICS=stack.metrics_urls["inference"],
    )
    out = run([str(client_venv / "venv/bin/python"), "program.py"], cwd=client_venv, env=env, timeout=600)
    summary = json.loads(out.strip().splitlines()[-1])
    # The client came from the venv, not from this repository.
    assert str(summary["client"]).startswith(str(client_venv / "venv"))
    assert summary["stream"]["pieces"] == 2 and summary["stream"]["in_flight_after"] == 0
    assert summary["invalid"] == {"reason": "INVALID_ARGUMENT", "fields": ["sampling.temperature"]}
    assert summary["not_found"] == {"reason": "MODEL_NOT_FOUND", "code": "NOT_FOUND"}
    assert f"models/{stack.settings.triton.default_model}" in summary["models"]["listed"]
    assert summary["records"]["transactions"] >= 2 and summary["records"]["events"] > 0
    assert summary["keys"]["revoked"] and summary["jobs"]["state"] == "STATE_SUCCEEDED"
    assert summary["conversations"] == {"answered": True, "messages": 2}
    assert summary["openai"]["choices"] == 1 and summary["health"] == "SERVING"
    assert summary["rate_limited"]["reason"] == "RATE_LIMITED" and summary["rate_limited"]["retry_delay"] > 0
    assert summary["async"]["pieces"] == 2


def test_a_call_whose_answer_is_lost_is_retried_and_done_once(client_venv: Path, stack: RunningStack) -> None:
    """UNAVAILABLE from a dropped connection, against the real stack: ferry served the first try, the
    answer never arrived, the client's retry answers, and the generation has one record."""
    upstream = ("127.0.0.1", stack.settings.envoy.port)
    read, generate = LossyProxy(upstream), LossyProxy(upstream)
    shutil.copy(RETRY_PROGRAM, client_venv / "retry_program.py")
    env = clean_env(
        FERRY_TARGET=stack.grpc_target,
        FERRY_API_KEY=stack.admin_key,
        FERRY_MODEL=stack.settings.triton.default_model,
        FERRY_LOSSY_READ=read.target,
        FERRY_LOSSY_GENERATE=generate.target,
    )
    try:
        out = run(
            [str(client_venv / "venv/bin/python"), "retry_program.py"], cwd=client_venv, env=env, timeout=300
        )
    finally:
        read.close()
        generate.close()
    summary = json.loads(out.strip().splitlines()[-1])
    assert str(summary["client"]).startswith(str(client_venv / "venv"))
    # Each forwarder lost one answer ferry had finished, and carried the retry on a new connection.
    for proxy in (read, generate):
        assert (proxy.lost_answers, proxy.connections, proxy.calls) == (1, 2, 2), vars(proxy)
    assert f"models/{stack.settings.triton.default_model}" in summary["read"]["models"]
    assert summary["generate"]["records"] == 1 and summary["generate"]["status"] == "STATUS_SUCCEEDED"
