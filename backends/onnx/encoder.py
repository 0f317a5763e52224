"""One embedding model in a process: its tokenizer and ONNX Runtime session, texts in, vectors out.

Used by the Triton glue (model.py) and, unchanged, by the bench's in-process baseline, so both run
exactly the same tokenisation, graph and pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

from backends.onnx.config import ConfigError, EmbeddingParameters
from backends.onnx.pooling import l2_normalize, pad, pool


@dataclass(frozen=True)
class Tokens:
    """One input's token ids as the model gets them, or, when it is too long and may not be cut,
    `too_long` = how many tokens it has."""

    ids: tuple[int, ...] = ()
    too_long: int = 0


class Encoder:
    def __init__(self, params: EmbeddingParameters, onnx_path: Path, tokenizer_path: Path) -> None:
        self.params = params
        # tokenizer.json files come with padding and truncation of their own (128 for MiniLM): off here,
        # padding is pooling.pad's and truncation only happens when a request asks for it.
        self.counting = Tokenizer.from_file(str(tokenizer_path))
        self.counting.no_truncation()
        self.counting.no_padding()
        self.truncating = Tokenizer.from_file(str(tokenizer_path))
        self.truncating.no_padding()
        self.truncating.enable_truncation(max_length=params.max_tokens)
        pad_id = self.counting.token_to_id("[PAD]")
        self.pad_id = pad_id if pad_id is not None else 0
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = params.intra_op_threads
        options.inter_op_num_threads = params.inter_op_threads
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # No memory arena: with it the process kept the peak of its largest batch for good (1.9 GiB after
        # 64 inputs of 200 tokens); without it memory goes back after each run (~350 MiB there).
        options.enable_cpu_mem_arena = False
        # Threads sleep between operators instead of spinning (ONNX Runtime's default): the cores are shared
        # with Triton's other models, the services and Envoy (the llamacpp models wait PASSIVE likewise).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = {tensor.name for tensor in self.session.get_inputs()}
        outputs = {tensor.name: tensor.shape for tensor in self.session.get_outputs()}
        if params.output_name not in outputs:
            raise ConfigError(f"{onnx_path} has no output {params.output_name} (it has {', '.join(outputs)})")
        width = outputs[params.output_name][-1]
        if isinstance(width, int) and width != params.dimension:
            raise ConfigError(f"{onnx_path} gives {width} dimensions, the config says {params.dimension}")

    @classmethod
    def load(cls, params: EmbeddingParameters, home: Path) -> Encoder:
        """The encoder of a model directory's parameters (files found under `home` where they are paths)."""
        return cls(params, params.onnx_path(home), params.tokenizer_path(home))

    def tokenize(self, texts: Sequence[str], truncate: Sequence[bool]) -> list[Tokens]:
        """Each text's tokens ([CLS] and [SEP] included); one over `max_tokens` is cut to it when its
        `truncate` says so, else marked `too_long`."""
        limit = self.params.max_tokens
        counted = self.counting.encode_batch(list(texts))
        out = [
            Tokens(ids=tuple(e.ids)) if len(e.ids) <= limit else Tokens(too_long=len(e.ids)) for e in counted
        ]
        cut = [i for i, tokens in enumerate(out) if tokens.too_long and truncate[i]]
        if cut:
            for i, encoding in zip(cut, self.truncating.encode_batch([texts[i] for i in cut]), strict=True):
                out[i] = Tokens(ids=tuple(encoding.ids))
        return out

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """[len(batch), dimension] float32 vectors, in the batch's order. The inputs are run shortest
        first, as few ONNX Runtime runs as `max_batch_tokens` allows (rows x longest row, padding
        included: what a run's memory grows with); similar lengths together also pad less."""
        out = np.zeros((len(batch), self.params.dimension), dtype=np.float32)
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        start = 0
        while start < len(order):
            end = start + 1
            while (
                end < len(order)
                and (end + 1 - start) * len(batch[order[end]]) <= self.params.max_batch_tokens
            ):
                end += 1
            rows = order[start:end]
            out[rows] = self._run([batch[i] for i in rows])
            start = end
        return out

    def _run(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """One ONNX Runtime run over `batch`."""
        input_ids, mask = pad(batch, self.pad_id)
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        (states,) = self.session.run([self.params.output_name], feeds)
        vectors = pool(states, mask, self.params.pooling)
        return l2_normalize(vectors) if self.params.normalize else vectors

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> vectors, cutting long ones (the bench's and tests' in-process reference)."""
        tokens = self.tokenize(texts, [True] * len(texts))
        return self.embed([t.ids for t in tokens])
