"""The benchmark's fixed, committed prompt set (prompts.jsonl): realistic texts of three lengths.

short ~50-80 tokens, medium ~200-260 (the default, ISL ~220), long ~440-510. Every request of a run
gets a fresh reference number in front of its prompt, so llama.cpp's prompt cache cannot serve a
prompt seen earlier (that would collapse TTFT): runs are comparable and no system is favoured.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.jsonl")
LENGTHS = ("short", "medium", "long")


def load(length: str = "medium") -> list[str]:
    entries = [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    texts = [entry["text"] for entry in entries if entry["length"] == length]
    if not texts:
        raise ValueError(f"no prompts of length {length!r}; choose one of {LENGTHS}")
    return texts


def unique(count: int, rng: random.Random, length: str = "medium") -> list[str]:
    """`count` prompts cycling through the set, each behind a reference number never used before."""
    texts = load(length)
    refs = rng.sample(range(100_000, 1_000_000), count)
    return [f"Ref {ref}.\n{texts[i % len(texts)]}" for i, ref in enumerate(refs)]
