"""Token states -> one vector per input: padding a batch, pooling, L2 normalisation. numpy only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from backends.onnx.config import Pooling


def pad(batch: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [len(batch), longest]: right-padded with `pad_id`, mask 0 there."""
    longest = max((len(ids) for ids in batch), default=0)
    input_ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return input_ids, mask


def pool(states: np.ndarray, mask: np.ndarray, how: Pooling) -> np.ndarray:
    """[batch, sequence, dimension] states -> [batch, dimension] float32 vectors. Padding never counts:
    a padded batch gives each input the vector it gets alone."""
    if how is Pooling.CLS:
        return states[:, 0, :].astype(np.float32)
    weights = mask[:, :, None].astype(np.float32)
    summed = (states.astype(np.float32) * weights).sum(axis=1)
    counts = np.clip(weights.sum(axis=1), 1e-9, None)
    return (summed / counts).astype(np.float32)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.clip(norms, 1e-12, None)).astype(np.float32)
