"""Turns a benchmark's results into the committed artefacts: JSON, a Markdown table, a PNG chart.

`bench/results/<date>-<commit>.{json,md,png}` plus `latest.md` / `latest.png` (the README shows it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.metrics import LATENCIES, RATES
from services.common.config import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "bench" / "results"
RAW = "raw"
FERRY_SYSTEMS = ("ferry-rest", "ferry-grpc", "triton")
LABELS = {
    "raw": "raw llama.cpp server (HTTP)",
    "ferry-rest": "ferry via Envoy REST",
    "ferry-grpc": "ferry via Envoy native gRPC",
    "raw-httpx": "raw llama.cpp server (HTTP, httpx cross-check)",
    "triton": "Triton direct (gRPC stream)",
}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = 0.0
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory_gib = round(kib / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "sha": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(
            git("status", "--porcelain", "--", "services", "launcher", "envoy", "triton_models", "gateway")
        ),
    }


def ratios(cell: dict[str, Any], raw: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in LATENCIES:
        for stat in ("p50", "p90", "p99"):
            out[f"{metric}.{stat}"] = _div(cell[metric][stat], raw[metric][stat])
    for rate in RATES:
        out[rate] = _div(cell[rate], raw[rate])
    return out


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _f(value: float, digits: int = 1) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"
    )


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = results["meta"]
    m = meta["machine"]
    lines.append(
        f"# ferry vs the raw engine — {meta['date']}, commit `{meta['commit']['sha']}`"
        + (" (uncommitted changes)" if meta["commit"]["dirty"] else "")
    )
    lines.append("")
    lines.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}. "
        f"Model: Gemma 3 270M Q4_K_M on llama.cpp (xllamacpp), engine {meta['engine']}. "
        f"Completions, streaming, prompts from bench/prompts ({meta['prompt_length']}, ISL ~{_f(meta.get('isl_avg', math.nan), 0)} tokens), "
        f"OSL {meta['max_tokens']} fixed (ignore_eos), warm-up then {meta['rounds']} alternating round(s) per level; "
        f"requests per run {meta['requests']}. Load average during runs: {_f(meta['load']['min'], 2)}-{_f(meta['load']['max'], 2)} "
        f"(mean {_f(meta['load']['mean'], 2)}). Bench wall time {_f(meta['duration_s'] / 60, 1)} min."
    )
    lines.append("")
    engine = results.get("engine")
    if engine:
        lines.append("## Through ferry vs the raw engine (same run)")
        lines.append("")
        lines.append(
            "| c | system | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | e2e p50 / p90 / p99 ms | out tok/s | req/s | errors |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for level in meta["levels"]:
            for system in engine:
                cell = engine[system].get(str(level))
                if not cell:
                    continue
                lines.append(
                    f"| {level} | {LABELS.get(system, system)} | "
                    + " | ".join(
                        " / ".join(
                            _f(cell[metric][stat], 1 if metric != "itl_ms" else 2)
                            for stat in ("p50", "p90", "p99")
                        )
                        for metric in LATENCIES
                    )
                    + f" | {_f(cell['output_tok_s'])} | {_f(cell['req_s'], 3)} | {cell['errors']} |"
                )
        lines.append("")
        lines.append(
            "Ratios ferry / raw (latency: lower is better, ≈1.00 = no cost; throughput: higher is better):"
        )
        lines.append("")
        lines.append(
            "| c | path | TTFT p50 / p90 / p99 | ITL p50 / p90 / p99 | e2e p50 / p90 / p99 | out tok/s | req/s | Δ TTFT p50 ms | Δ ITL p50 ms |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for level in meta["levels"]:
            for system, by_level in results["ratios"].items():
                r = by_level.get(str(level))
                if not r:
                    continue
                d = results["deltas"][system][str(level)]
                lines.append(
                    f"| {level} | {system} | "
                    + " | ".join(
                        " / ".join(_f(r[f"{metric}.{stat}"], 2) for stat in ("p50", "p90", "p99"))
                        for metric in LATENCIES
                    )
                    + f" | {_f(r['output_tok_s'], 2)} | {_f(r['req_s'], 2)} | {_f(d['ttft_p50_ms'], 1)} | {_f(d['itl_p50_ms'], 2)} |"
                )
        lines.append("")
    tier = results.get("tier")
    if tier:
        lines.append(f"## Tier overhead (trivial model streaming {tier['tokens']} tokens, no compute)")
        lines.append("")
        lines.append(
            "| c | path | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 ms | tok/s | req/s | + per request (Δ TTFT p50) | + per token (Δ ITL p50) | + e2e p50 |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for level in tier["levels"]:
            for system, by_level in tier["cells"].items():
                cell = by_level.get(str(level))
                if not cell:
                    continue
                over = tier["overhead"].get(system, {}).get(str(level))
                extra = (
                    f"{_f(over['ttft_p50_ms'], 2)} ms | {_f(over['itl_p50_ms'] * 1000, 0)} µs | {_f(over['e2e_p50_ms'], 2)} ms"
                    if over
                    else "— | — | —"
                )
                lines.append(
                    f"| {level} | {LABELS.get(system, system)} | {_f(cell['ttft_ms']['p50'], 2)} / {_f(cell['ttft_ms']['p99'], 2)} | "
                    f"{_f(cell['itl_ms']['p50'], 3)} / {_f(cell['itl_ms']['p99'], 3)} | {_f(cell['e2e_ms']['p50'], 2)} / {_f(cell['e2e_ms']['p99'], 2)} | "
                    f"{_f(cell['output_tok_s'], 0)} | {_f(cell['req_s'], 1)} | {extra} |"
                )
        lines.append("")
    if results.get("tier_error"):
        lines.append(f"Tier overhead: not measured in this run ({results['tier_error']}).")
        lines.append("")
    targets = results.get("targets")
    if targets:
        lines.append("## Targets (goals, not test assertions)")
        lines.append("")
        lines.append("| target | measured | met |")
        lines.append("|---|---|---|")
        for t in targets:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    lines.append(
        "Clients: the engine comparison's HTTP rows are NVIDIA aiperf 0.13 (`/v1/completions`, streaming, "
        "server token counts); its gRPC rows and all tier rows are bench/clients.py (grpc.aio, httpx, tritonclient aio)."
    )
    lines.append("")
    lines.append(
        "Definitions (aiperf's, applied to every client's per-request records by bench/metrics.py): TTFT = request sent → first "
        "chunk with text; ITL = (e2e - TTFT) / (output tokens - 1) per request; e2e = request sent → last chunk; "
        "throughput = totals over first start → last end of the measured requests (mean of the rounds); latency percentiles over all "
        "requests of the rounds. Raw results in the JSON file beside this one."
    )
    lines.append("")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = results.get("engine") or {}
    levels = results["meta"]["levels"]
    fig, (ax_tok, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, by_level in engine.items():
        xs = [c for c in levels if str(c) in by_level]
        if not xs:
            continue
        ax_tok.plot(
            xs, [by_level[str(c)]["output_tok_s"] for c in xs], marker="o", label=LABELS.get(system, system)
        )
        ax_ttft.plot(
            xs, [by_level[str(c)]["ttft_ms"]["p50"] for c in xs], marker="o", label=LABELS.get(system, system)
        )
    ax_tok.set(title="Output throughput", xlabel="concurrency", ylabel="output tokens/s", xticks=levels)
    ax_ttft.set(title="Time to first token (p50)", xlabel="concurrency", ylabel="ms", xticks=levels)
    ax_tok.set_ylim(bottom=0)
    ax_ttft.set_ylim(bottom=0)
    for ax in (ax_tok, ax_ttft):
        ax.grid(alpha=0.3)
    ax_tok.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(
        f"ferry vs raw llama.cpp — Gemma 3 270M, {meta['machine']['cores']} cores, commit {meta['commit']['sha']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], results_dir: Path = RESULTS_DIR) -> dict[str, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = results["meta"]
    stem = f"{meta['date']}-{meta['commit']['sha']}"
    paths = {
        "json": results_dir / f"{stem}.json",
        "md": results_dir / f"{stem}.md",
        "png": results_dir / f"{stem}.png",
    }
    paths["json"].write_text(json.dumps(finite(results), indent=1, default=str) + "\n")
    text = markdown(results)
    paths["md"].write_text(text)
    chart(results, paths["png"])
    (results_dir / "latest.md").write_text(text.replace(f"{stem}.json", "latest.json"))
    (results_dir / "latest.png").write_bytes(paths["png"].read_bytes())
    return paths


def write_side_results(
    kind: str, meta: dict[str, Any], results: dict[str, Any], text: str, results_dir: Path, suffix: str = ""
) -> Path:
    """A side measurement's files (cache, prefix, overload, embeddings) beside the engine runs:
    `<kind>-<date>-<sha><suffix>.json` (NaN as null) and `.md`; the Markdown file's path.
    `meta` holds the run's `date` and `commit` (report.commit())."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{kind}-{meta['date']}-{meta['commit']['sha']}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(finite(results), indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    return stem.with_suffix(".md")


def finite(value: Any) -> Any:
    """NaN (a metric with no data) becomes null: the JSON file stays valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
