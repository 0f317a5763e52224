"""The onnx backend's encoder in this process (no Triton): a batch gives each input the vector it gets
alone, whatever its company and however the batch is split into ONNX Runtime runs."""

from __future__ import annotations

import numpy as np

from backends.onnx.encoder import Encoder
from services.common.config import Settings

TEXTS = ["stock prices fell", "word " * 120, "a cat sits on the mat", "a kitten is on the rug " * 5]


def test_a_batch_gives_each_input_its_own_vector_in_order(reference: Encoder) -> None:
    together = reference.encode(TEXTS)
    alone = np.stack([reference.encode([text])[0] for text in TEXTS])
    assert together.shape == (4, 384)
    assert np.allclose(together, alone, atol=1e-5)


def test_a_small_token_budget_splits_runs_without_changing_vectors(reference: Encoder) -> None:
    # One input of up to 256 tokens per run.
    small = Encoder.load(reference.params.model_copy(update={"max_batch_tokens": 256}), Settings().home)
    assert np.allclose(small.encode(TEXTS), reference.encode(TEXTS), atol=1e-5)


def test_long_inputs_are_cut_or_marked_too_long(reference: Encoder) -> None:
    cut, refused = reference.tokenize(["word " * 300, "word " * 300], [True, False])
    assert len(cut.ids) == 256 and cut.ids[0] == 101 and cut.ids[-1] == 102  # [CLS] ... [SEP]
    assert refused.too_long == 302 and not refused.ids
