"""Hierarchical vision models from stage configs: configs, layers, token mixers, presets, checkpoints.

The xformers names (``BasicLayerConfig``, ``get_hierarchical_configuration``, ``xFormerConfig``,
``xFormer``) are here, so xformers' hierarchical examples run with only their import line changed.
"""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from .config import ConfigError, HeadConfig, ModelConfig, StageConfig
from .factory import create_model, default_preprocess, resolve_config
from .hierarchical import Classifier, Trunk
from .presets import get_preset, list_presets
from .xformers_compat import BasicLayerConfig, get_hierarchical_configuration, xFormer, xFormerConfig

__all__ = [
    "BasicLayerConfig",
    "Checkpoint",
    "CheckpointError",
    "Classifier",
    "ConfigError",
    "HeadConfig",
    "ModelConfig",
    "StageConfig",
    "Trunk",
    "create_model",
    "default_preprocess",
    "get_hierarchical_configuration",
    "get_preset",
    "list_presets",
    "load_checkpoint",
    "read_metadata",
    "resolve_config",
    "save_checkpoint",
    "xFormer",
    "xFormerConfig",
]
