"""Logits to answers: probabilities, the top classes, and the Open Inference Protocol's classification
strings. Written once, used by /v1, /v2 and gRPC."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stageformer.core.scores import softmax


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float  # softmax probability


def top_k(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[Prediction]]:
    """For each row of ``logits [batch, classes]``, its ``k`` most probable classes, best first (ties in
    class order)."""
    probs = softmax(logits)
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [
        [Prediction(labels[i], int(i), float(row_probs[i])) for i in row_order]
        for row_probs, row_order in zip(probs, order, strict=True)
    ]


def classification_strings(logits: np.ndarray, labels: Sequence[str], k: int) -> np.ndarray:
    """The classification extension's ``BYTES [batch, k]`` tensor: ``"score:index:label"`` strings."""
    rows = [[f"{p.score:f}:{p.index}:{p.label}" for p in row] for row in top_k(logits, labels, k)]
    return np.asarray(rows, dtype=object).reshape(len(rows), -1)
