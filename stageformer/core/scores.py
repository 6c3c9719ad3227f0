"""Logits to probabilities, shared by the server (top-k, classification strings) and export (the int8
agreement gate), so both speak of the same numbers."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis, in float64 (stable for large logits)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))
