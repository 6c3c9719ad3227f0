"""Training recipes: the hyperparameters a run starts from, in general and per model preset.

``model.train`` trains with them, and ``stageformer.train_args`` writes the defaults in the help of
``stageformer train`` from them, so the help names the values a run uses. Torch-free on purpose: the
help must not import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FINAL_LR_RATIO = 0.01  # the cosine decays to this fraction of the peak learning rate
WORKERS_RULE = "min(8, CPUs - 1)"  # how DEFAULT_RECIPE.workers is chosen, as the help states it


def _default_workers() -> int:
    """``WORKERS_RULE`` on this machine, at least 1: one core is left to the training process itself."""
    return min(8, max(1, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters with a default per preset (``RECIPES``); any of them can be set in
    ``model.train.TrainOptions`` or on the command line."""

    epochs: int = 30  # passes over the training set
    batch_size: int = 64  # images per step and process
    lr: float = 5e-4  # peak learning rate, reached after the warmup
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on biases, norms, scales)
    warmup_epochs: float = 1.0  # linear warmup from ~0 to lr, then cosine decay to lr * FINAL_LR_RATIO
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    clip_grad: float = 1.0  # clip the gradients' global norm to this; 0 turns clipping off
    workers: int = _default_workers()  # data loader worker processes per rank
    threads: int = 0  # PyTorch CPU threads per process; 0 keeps PyTorch's own choice

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train: {name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"train: lr must be positive, got {self.lr}")
        for name in ("weight_decay", "warmup_epochs", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"train: {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"train: label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("workers", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train: {name} must be >= 0, got {getattr(self, name)}")


DEFAULT_RECIPE = Recipe()
# Per-preset defaults, used when that preset is trained (and named in `stageformer train --help`).
RECIPES: dict[str, Recipe] = {
    # The demo, on the `digits` data (scikit-learn's, typed and drawn digits; 15,650 pictures an epoch):
    # about 720 CPU-seconds, some 6 minutes on 2 idle cores. One worker augments while one thread trains,
    # which also stays fast when other programs share the CPU. Figures: docs/training.md, "The demo model".
    "digits": Recipe(
        epochs=24,
        batch_size=64,
        lr=2e-3,
        weight_decay=0.05,
        warmup_epochs=1,
        label_smoothing=0.1,
        workers=1,
        threads=1,
    ),
}
