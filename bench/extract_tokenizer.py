"""Writes the GGUF's tokenizer as a Hugging Face tokenizer directory, for aiperf's token counting.

Runs once, in the side environment build/bench/tokenizer-venv (transformers + gguf + CPU torch), never
at test time: `python extract_tokenizer.py MODEL.gguf OUT_DIR`. The ids match llama.cpp's.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    from transformers import AutoTokenizer

    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    print(f"tokenizer written to {out}: vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
