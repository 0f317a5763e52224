"""Runs NVIDIA aiperf (the field's LLM benchmark client) against an OpenAI-compatible endpoint.

aiperf lives in its own venv (build/bench/aiperf-venv, from bench/requirements-aiperf.txt) and
works offline only with a local tokenizer directory (see bench.sidecar). The flags are the ones
verified on this machine (shared/RUNTIME.md): paced concurrency (`--request-rate 100 --arrival-pattern
constant`; plain `--concurrency` busy-spins a core), fresh connections, one worker. The prompts are
ours (a single_turn JSONL file with fixed output lengths), so aiperf's records and our gRPC client see
the same inputs. Its per-request records are read back into bench.metrics.Record, so one set of
definitions computes every number in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.metrics import Record


@dataclass(frozen=True)
class AiperfResult:
    records: list[Record]
    summary: dict[str, Any]  # aiperf's own summary of the measured phase (for cross-checks)
    prompt_cache_read_tokens: float
    wall_s: float


def write_dataset(path: Path, prompts: Sequence[str], max_tokens: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for prompt in prompts:
            out.write(json.dumps({"text": prompt, "output_length": max_tokens}) + "\n")


def command(
    aiperf: Path,
    url: str,
    model: str,
    tokenizer: Path,
    dataset: Path,
    concurrency: int,
    requests: int,
    warmup: int,
    seed: int,
    out_dir: Path,
    api_key: str | None = None,
) -> list[str]:
    # aiperf sends it as `Authorization: Bearer <key>`, like the OpenAI SDK.
    auth = ["--api-key", api_key] if api_key else []
    return [
        str(aiperf), "profile", *auth,
        "--model", model,
        "--url", url,
        "--endpoint-type", "completions",
        "--streaming",
        "--tokenizer", str(tokenizer),
        "--custom-dataset-type", "single_turn",
        "--input-file", str(dataset),
        "--dataset-sampling-strategy", "sequential",
        "--extra-inputs", "ignore_eos:true",
        "--use-server-token-count",
        "--concurrency", str(concurrency),
        "--request-rate", "100",
        "--arrival-pattern", "constant",
        "--request-count", str(requests),
        "--warmup-request-count", str(warmup),
        "--connection-reuse-strategy", "never",
        "--workers-max", "1",
        "--record-processors", "1",
        "--ui", "none",
        "--no-server-metrics",
        "--no-gpu-telemetry",
        "--random-seed", str(seed),
        "--artifact-dir", str(out_dir),
    ]  # fmt: skip


def read_records(path: Path) -> list[Record]:
    """aiperf's profile_export.jsonl (measured phase only) -> Records on aiperf's clock."""
    records = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        meta, metrics = entry["metadata"], entry["metrics"]
        if meta.get("benchmark_phase") not in (None, "profiling"):
            continue
        start = meta["request_start_ns"] / 1e9
        end = meta["request_end_ns"] / 1e9
        ttft = metrics.get("time_to_first_token", {}).get("value")
        tokens = metrics.get("output_sequence_length", {}).get("value") or 0
        error = entry.get("error")
        records.append(
            Record(
                start=start,
                end=end,
                ttft=ttft / 1000 if ttft is not None else None,
                output_tokens=int(tokens),
                error=json.dumps(error) if error else None,
            )
        )
    return records


def run(
    aiperf: Path,
    url: str,
    model: str,
    tokenizer: Path,
    prompts: Sequence[str],
    concurrency: int,
    warmup: int,
    max_tokens: int,
    seed: int,
    work_dir: Path,
    timeout_s: float = 900,
    api_key: str | None = None,
) -> AiperfResult:
    """One aiperf run; `prompts` holds the warm-up prompts first, then the measured ones."""

    dataset = work_dir / "dataset.jsonl"
    write_dataset(dataset, prompts, max_tokens)
    out_dir = work_dir / "aiperf"
    argv = command(
        aiperf, url, model, tokenizer, dataset, concurrency, len(prompts) - warmup, warmup, seed, out_dir,
        api_key,
    )  # fmt: skip
    # aiperf leaves mmap files in TMPDIR, and puts its ZeroMQ socket files there (paths must stay
    # under 107 characters): a short scratch folder, removed afterwards.
    tmp = Path(tempfile.mkdtemp(prefix="aiperf-"))
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("HF_HUB_OFFLINE", None)  # with it set, aiperf refuses a local tokenizer path
    started = time.monotonic()
    log = work_dir / "aiperf.log"
    try:
        with log.open("w") as out:
            proc = subprocess.run(
                argv, cwd=work_dir, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - started
    summary_file = out_dir / "profile_export_aiperf.json"
    if proc.returncode != 0 or not summary_file.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"aiperf failed (exit {proc.returncode}); log {log}:\n{tail}")
    summary = json.loads(summary_file.read_text())
    cache = summary.get("total_usage_prompt_cache_read_tokens", {}).get("avg", 0.0)
    return AiperfResult(read_records(out_dir / "profile_export.jsonl"), summary, float(cache or 0), wall)
