"""The onnx backend's pooling on tiny hand-made inputs: padding never counts, vectors have length 1."""

from __future__ import annotations

import numpy as np

from backends.onnx.config import Pooling
from backends.onnx.pooling import l2_normalize, pad, pool


def test_pad_right_pads_and_masks_the_padding() -> None:
    ids, mask = pad([[101, 7, 102], [101, 102]], pad_id=0)
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ids.dtype == mask.dtype == np.int64


def test_mean_pooling_ignores_padded_positions() -> None:
    states = np.array(
        [
            [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
            [[2.0, 0.0], [4.0, 0.0], [100.0, 100.0]],  # the last position is padding
        ]
    )
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    pooled = pool(states, mask, Pooling.MEAN)
    assert pooled.tolist() == [[3.0, 4.0], [3.0, 0.0]]
    assert pooled.dtype == np.float32
    assert pool(states, mask, Pooling.CLS).tolist() == [[1.0, 2.0], [2.0, 0.0]]


def test_l2_normalisation_gives_unit_rows_and_leaves_zero_rows() -> None:
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])
