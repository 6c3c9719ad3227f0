"""Typed, frozen model configuration: stages, model-level options and the classification head.

A config is a value: building a model twice from the same config (and the same seed) gives the same
model, and a config survives a JSON round trip unchanged. Every field is checked in
``__post_init__``; an error says which field is wrong and how to fix it. Names of pluggable parts
(token mixers, feedforwards, norms, activations, position encodings) are plain strings here; each kind
is resolved in one lookup table from name to class or factory: ``model.mixers.TOKEN_MIXER_LAYERS`` and
``model.layers.FEEDFORWARD_LAYERS``, ``NORM_LAYERS``, ``ACTIVATION_LAYERS`` and
``POSITION_ENCODING_LAYERS``. The residual norm style and the head kind are branches in
``model.hierarchical``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

# Names accepted in configs. The lookup tables named in the module docstring have the same keys
# (tests/model/test_layers.py checks).
TOKEN_MIXERS = ("scaled_dot_product", "pooling", "visual", "sepconv", "identity")
FEEDFORWARDS = ("mlp", "conv2d")
NORMS = ("layernorm", "layernorm_nobias", "groupnorm", "groupnorm_nobias", "skip")
ACTIVATIONS = ("gelu", "relu", "squared_relu", "star_relu")
RESIDUAL_NORM_STYLES = ("pre", "post", "deepnorm")
POSITION_ENCODINGS = ("none", "learnable", "sine")
HEAD_KINDS = ("linear", "mlp")

# xformers spelled some of these differently; configs written for it keep working.
FEEDFORWARD_ALIASES = {"MLP": "mlp", "Conv2DFeedforward": "conv2d", "mlp": "mlp", "conv2d": "conv2d"}


class ConfigError(ValueError):
    """A model configuration is invalid; the message says which field and how to fix it."""


def _choice(where: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {name}={value!r} is not supported; choose one of {', '.join(choices)}")


def _positive(where: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: {name} must be a positive number, got {value!r}")


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Side of the token grid after a patch embedding (a strided convolution) on a grid of ``size``."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class StageConfig:
    """One stage: a patch embedding that shrinks the token grid, then ``depth`` identical blocks."""

    dim: int  # token width (channels) inside this stage
    depth: int = 1  # number of blocks
    mixer: str = "pooling"  # token mixer, one of TOKEN_MIXERS
    patch_size: int | None = 3  # patch embedding kernel; None keeps the grid (needs the previous width)
    stride: int = 2  # patch embedding stride: the grid shrinks by this factor
    padding: int = 1  # patch embedding padding
    feedforward: str = "mlp"  # one of FEEDFORWARDS (xformers' "MLP" / "Conv2DFeedforward" accepted)
    mlp_ratio: float = 4.0  # feedforward hidden width = mlp_ratio * dim
    mlp_bias: bool = True  # biases in the feedforward's two projections
    activation: str = "gelu"  # feedforward (and sepconv) activation, one of ACTIVATIONS
    norm: str = "layernorm"  # norm inside the blocks, one of NORMS
    norm_eps: float = 1e-5  # epsilon of the block norms and of this stage's patch-embedding norm
    head_dim: int = 32  # attention: width of one head
    num_heads: int | None = None  # attention: heads; None means dim // head_dim (at least 1)
    attn_bias: bool = True  # attention: biases in the qkv and output projections
    rotary: bool = False  # attention: rotary position embeddings on queries and keys
    pool_size: int = 3  # pooling mixer: average-pool window
    kernel_size: int = 7  # sepconv mixer: depthwise kernel
    expansion_ratio: float = 2.0  # sepconv mixer: hidden width = expansion_ratio * dim
    layer_scale: float | None = None  # initial value of per-channel branch scales; None: no scale
    res_scale: float | None = None  # initial value of per-channel residual scales; None: no scale
    dropout: float = 0.0  # dropout after the mixer and inside the feedforward

    def __post_init__(self) -> None:
        where = f"stage(dim={self.dim})"
        _positive(where, "dim", self.dim)
        _positive(where, "depth", self.depth)
        if not isinstance(self.dim, int) or not isinstance(self.depth, int):
            raise ConfigError(f"{where}: dim and depth must be integers")
        _choice(where, "mixer", self.mixer, TOKEN_MIXERS)
        if self.feedforward not in FEEDFORWARD_ALIASES:
            _choice(where, "feedforward", self.feedforward, FEEDFORWARDS)
        object.__setattr__(self, "feedforward", FEEDFORWARD_ALIASES[self.feedforward])
        _choice(where, "activation", self.activation, ACTIVATIONS)
        _choice(where, "norm", self.norm, NORMS)
        if self.patch_size is not None:
            _positive(where, "patch_size", self.patch_size)
            _positive(where, "stride", self.stride)
            if self.padding < 0 or self.padding >= self.patch_size:
                raise ConfigError(
                    f"{where}: padding={self.padding} must be in [0, patch_size) = [0, {self.patch_size})"
                )
        _positive(where, "mlp_ratio", self.mlp_ratio)
        _positive(where, "norm_eps", self.norm_eps)
        _positive(where, "head_dim", self.head_dim)
        if self.num_heads is not None:
            _positive(where, "num_heads", self.num_heads)
        if self.pool_size % 2 != 1:
            raise ConfigError(f"{where}: pool_size must be odd so the grid keeps its size, got {self.pool_size}")
        if self.kernel_size % 2 != 1:
            raise ConfigError(f"{where}: kernel_size must be odd so the grid keeps its size, got {self.kernel_size}")
        _positive(where, "expansion_ratio", self.expansion_ratio)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        if self.rotary and self.mixer != "scaled_dot_product":
            raise ConfigError(f"{where}: rotary embeddings need mixer='scaled_dot_product', not {self.mixer!r}")

    @property
    def heads(self) -> int:
        """Attention heads this stage uses."""
        return self.num_heads if self.num_heads is not None else max(1, self.dim // self.head_dim)


@dataclass(frozen=True)
class HeadConfig:
    """The classifier on top of the trunk: average pool over tokens, norm, dropout, then linear or MLP."""

    kind: str = "linear"  # "linear", or "mlp" (fc, activation, norm, fc: MetaFormer v2's head)
    norm: str = "skip"  # norm of the pooled features, one of NORMS
    norm_eps: float = 1e-5  # epsilon of that norm (and of the MLP head's inner norm)
    mlp_ratio: float = 4.0  # MLP head hidden width = mlp_ratio * trunk width
    activation: str = "squared_relu"  # MLP head activation
    dropout: float = 0.0  # dropout before the last projection

    def __post_init__(self) -> None:
        _choice("head", "kind", self.kind, HEAD_KINDS)
        _choice("head", "norm", self.norm, NORMS)
        _choice("head", "activation", self.activation, ACTIVATIONS)
        _positive("head", "norm_eps", self.norm_eps)
        _positive("head", "mlp_ratio", self.mlp_ratio)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head: dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole hierarchical model: stages, model-level options and the head."""

    stages: tuple[StageConfig, ...]  # at least one; the first must have a patch embedding
    image_size: int = 224  # square input side the model is built for
    in_channels: int = 3  # input image channels
    num_classes: int = 1000  # classes of the head; 0 builds no head (pooled features out)
    residual_norm_style: str = "pre"  # "pre", "post" or "deepnorm"
    position_encoding: str = "none"  # added once per stage after its patch embedding
    embed_norm: str = "skip"  # norm in patch embeddings: after the first conv, before later ones
    final_norm: str = "skip"  # norm over the trunk's output tokens (pre-norm stacks end with one)
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly over all blocks to this value
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        stages = tuple(StageConfig(**s) if isinstance(s, Mapping) else s for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if isinstance(self.head, Mapping):
            object.__setattr__(self, "head", HeadConfig(**self.head))
        if not stages:
            raise ConfigError("model: stages is empty; give at least one StageConfig")
        for i, s in enumerate(stages):
            if not isinstance(s, StageConfig):
                raise ConfigError(f"model: stages[{i}] must be a StageConfig or a dict, got {type(s).__name__}")
        _positive("model", "image_size", self.image_size)
        _positive("model", "in_channels", self.in_channels)
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"model: num_classes must be an integer >= 0, got {self.num_classes!r}")
        _choice("model", "residual_norm_style", self.residual_norm_style, RESIDUAL_NORM_STYLES)
        _choice("model", "position_encoding", self.position_encoding, POSITION_ENCODINGS)
        _choice("model", "embed_norm", self.embed_norm, NORMS)
        _choice("model", "final_norm", self.final_norm, NORMS)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if stages[0].patch_size is None:
            raise ConfigError("model: stages[0] needs a patch embedding (patch_size) to turn pixels into tokens")
        for i in range(1, len(stages)):
            if stages[i].patch_size is None and stages[i].dim != stages[i - 1].dim:
                raise ConfigError(
                    f"model: stages[{i}] has no patch embedding, so its dim must equal stages[{i - 1}].dim="
                    f"{stages[i - 1].dim} (got {stages[i].dim}); give it a patch_size or the same dim"
                )
        sizes = self.grid_sizes()
        for i, side in enumerate(sizes):
            if side < 1:
                raise ConfigError(
                    f"model: stages[{i}] leaves no tokens at image_size={self.image_size}; "
                    "use a larger image or fewer/smaller strides"
                )

    # --- derived values -------------------------------------------------------------------------

    def grid_sizes(self) -> list[int]:
        """Side of the square token grid in each stage, for an input of ``image_size``."""
        side, sizes = self.image_size, []
        for s in self.stages:
            if s.patch_size is not None:
                side = conv_output_size(side, s.patch_size, s.stride, s.padding)
            sizes.append(side)
        return sizes

    def seq_lens(self) -> list[int]:
        """Number of tokens in each stage."""
        return [side * side for side in self.grid_sizes()]

    @property
    def width(self) -> int:
        """Width of the trunk's output tokens (the last stage's dim)."""
        return self.stages[-1].dim

    @property
    def depth(self) -> int:
        """Number of blocks over all stages."""
        return sum(s.depth for s in self.stages)

    # --- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``ModelConfig.from_dict`` gives back an equal config."""
        data = dataclasses.asdict(self)
        data["stages"] = list(data["stages"])
        return data

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys raise an error naming the valid ones (typos are never dropped)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        data = dict(_checked_keys(cls, data, "model"))
        if "stages" not in data:
            raise ConfigError("model config: 'stages' is missing; give a list of stage objects")
        stages = data["stages"]
        if not isinstance(stages, (list, tuple)):
            raise ConfigError("model config: 'stages' must be a list of stage objects")
        data["stages"] = tuple(
            StageConfig(**_checked_keys(StageConfig, s, f"stages[{i}]")) for i, s in enumerate(stages)
        )
        if "head" in data:
            data["head"] = HeadConfig(**_checked_keys(HeadConfig, data["head"], "head"))
        try:
            return cls(**data)
        except TypeError as exc:  # a wrong value type that dataclasses reject before validation
            raise ConfigError(f"model config: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


_T = TypeVar("_T")


def _checked_keys(cls: type[_T], data: object, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
    return dict(data)


def replace(config: ModelConfig, **overrides: Any) -> ModelConfig:
    """``dataclasses.replace`` that names the valid fields when given an unknown one."""
    _checked_keys(ModelConfig, overrides, "model overrides")
    return dataclasses.replace(config, **overrides)
