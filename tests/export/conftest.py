from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from model import ModelConfig, StageConfig, create_model, default_preprocess, save_checkpoint
from stageformer.core.preprocess import PreprocessConfig

MakeCheckpoint = Callable[..., Path]

SMALL_PREPROCESS = PreprocessConfig(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 1.0, "bilinear")


def small_config(mixer: str = "pooling", num_classes: int = 5, **stage_options: object) -> ModelConfig:
    """Two stages at 32x32: a stem and a downsampling stage, both with ``mixer``."""
    stages = (
        StageConfig(dim=16, mixer=mixer, patch_size=4, stride=4, padding=0, head_dim=8, **stage_options),  # type: ignore[arg-type]
        StageConfig(dim=24, mixer=mixer, head_dim=8, **stage_options),  # type: ignore[arg-type]
    )
    return ModelConfig(stages, image_size=32, num_classes=num_classes, final_norm="layernorm")


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> MakeCheckpoint:
    """``make_checkpoint(preset_or_config, labels=None, preprocess=None, file_name=None) -> Path``: a
    freshly initialised model saved as a checkpoint under ``tmp_path / "ckpt"``."""

    def make(
        what: str | ModelConfig,
        labels: Sequence[str] | None = None,
        preprocess: PreprocessConfig | None = None,
        file_name: str | None = None,
    ) -> Path:
        torch.manual_seed(0)
        model = create_model(what)
        if preprocess is None:
            preprocess = default_preprocess(what) if isinstance(what, str) else SMALL_PREPROCESS
        stem = file_name or (what if isinstance(what, str) else "model")
        return save_checkpoint(model, tmp_path / "ckpt" / f"{stem}.safetensors", preprocess, labels)

    return make


def files_under(path: Path) -> list[str]:
    """Every file and directory below ``path`` (hidden ones included), relative, sorted."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []
