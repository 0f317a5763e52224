"""The benchmark's side environments, kept out of `make install` so `make test` stays light.

- build/bench/aiperf-venv: aiperf (bench/requirements-aiperf.txt), installed with uv on first use.
- build/bench/tokenizer-venv: transformers + gguf + CPU torch (bench/requirements-tokenizer.txt),
  used once to extract the GGUF's tokenizer to $FERRY_HOME/bench/tokenizer (cached; never at test time).
Each venv records the requirements it was built from and is rebuilt when they change.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from services.common.config import REPO_ROOT

BENCH_DIR = REPO_ROOT / "bench"
BUILD_DIR = REPO_ROOT / "build" / "bench"
UV = Path(sys.executable).with_name("uv")


def _fingerprint(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def _venv(name: str, requirements: Path, use_pip: bool) -> Path:
    venv = BUILD_DIR / name
    stamp = venv / ".requirements-sha256"
    python = venv / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text() == _fingerprint(requirements):
        return venv
    print(f"bench: building {venv} from {requirements.name} (once)", flush=True)
    if use_pip:
        # pip, not uv: pip reads the machine's pip configuration (local wheel folders such as the
        # CPU-only torch build); uv would fetch the far larger default torch wheel.
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
                str(requirements),
            ],
            check=True,
        )
    else:
        subprocess.run(
            [str(UV), "venv", "-q", "--allow-existing", "--python", sys.executable, str(venv)], check=True
        )
        subprocess.run(
            [str(UV), "pip", "install", "-q", "--python", str(python), "-r", str(requirements)], check=True
        )
    stamp.write_text(_fingerprint(requirements))
    return venv


def aiperf_binary() -> Path:
    return _venv("aiperf-venv", BENCH_DIR / "requirements-aiperf.txt", use_pip=False) / "bin" / "aiperf"


def tokenizer_dir(home: Path, model_file: Path) -> Path:
    """The GGUF's tokenizer as a Hugging Face directory, extracted once and cached under $FERRY_HOME."""
    out = home / "bench" / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    venv = _venv("tokenizer-venv", BENCH_DIR / "requirements-tokenizer.txt", use_pip=True)
    # -P: without it the script's folder (bench/) comes first on sys.path and bench/platform.py
    # shadows the standard library's `platform` that numpy imports.
    script = BENCH_DIR / "extract_tokenizer.py"
    subprocess.run([str(venv / "bin" / "python"), "-P", str(script), str(model_file), str(out)], check=True)
    return out
