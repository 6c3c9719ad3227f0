"""``create_model``: one entry point from a preset name, a JSON file, a dict or a config to a model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stageformer.core.preprocess import PreprocessConfig

from .config import ConfigError, ModelConfig, replace
from .hierarchical import Classifier
from .presets import get_preset, list_presets
from .xformers_compat import xFormerConfig

ConfigLike = str | os.PathLike[str] | Mapping[str, Any] | ModelConfig | xFormerConfig


def resolve_config(name_or_config: ConfigLike) -> ModelConfig:
    """A preset name, a path to a JSON config, a config dict, an ``xFormerConfig`` or a ``ModelConfig``."""
    if isinstance(name_or_config, ModelConfig):
        return name_or_config
    if isinstance(name_or_config, xFormerConfig):
        return name_or_config.model_config
    if isinstance(name_or_config, Mapping):
        return ModelConfig.from_dict(name_or_config)
    if isinstance(name_or_config, (str, os.PathLike)):
        text = os.fspath(name_or_config)
        if text.endswith(".json") or os.sep in text or isinstance(name_or_config, os.PathLike):
            path = Path(text)
            if not path.is_file():
                raise FileNotFoundError(f"model config file {text!r} does not exist")
            return ModelConfig.from_json(path.read_text())
        try:
            return get_preset(text).config
        except KeyError:
            raise ConfigError(
                f"{text!r} is neither a preset nor a .json config file; presets: {', '.join(list_presets())}"
            ) from None
    raise ConfigError(f"cannot build a model from a {type(name_or_config).__name__}")


def default_preprocess(name_or_config: ConfigLike) -> PreprocessConfig:
    """The preset's preprocessing, or ImageNet statistics at the config's image size with a 0.875 centre
    crop (no crop below 64 pixels)."""
    if isinstance(name_or_config, str):
        try:
            return get_preset(name_or_config).preprocess
        except KeyError:
            pass
    config = resolve_config(name_or_config)
    return PreprocessConfig(image_size=config.image_size, crop_pct=1.0 if config.image_size < 64 else 0.875)


def create_model(name_or_config: ConfigLike, num_classes: int | None = None, **overrides: Any) -> Classifier:
    """Build a freshly initialised model. ``num_classes`` and ``overrides`` replace fields of the
    ``ModelConfig`` (unknown names raise an error listing the valid ones). Seed torch first for
    reproducible weights: the same seed and config always give the same model."""
    config = resolve_config(name_or_config)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if overrides:
        config = replace(config, **overrides)
    return Classifier(config)
