"""The xformers hierarchical-transformer API, so code written for it runs with only its import changed.

``BasicLayerConfig`` + ``get_hierarchical_configuration`` produce xformers' per-layer block config
dicts; ``xFormerConfig`` reads such a list (strictly: unknown keys and names are errors that list the
valid ones) into a typed ``ModelConfig``; ``xFormer.from_config`` builds the trunk, which maps images
(B, C, H, W) to tokens (B, N, C). Where xformers was wrong, this module is not: the residual norm style
default is a usable value, repeated layers get their own dicts (and their own modules), a pre-norm
stack ends with its final norm, a ``seq_len`` that the image and patch geometry contradict is an
error giving the expected value, and nothing is printed.

Differences that remain on purpose: a position encoding is added once per stage (after the stage's
patch embedding), not once per layer; pooling and visual mixers have no input/output projections
(as in MetaFormer); only the attention mechanisms in ``model.config.TOKEN_MIXERS`` exist.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import (
    ACTIVATIONS,
    FEEDFORWARD_ALIASES,
    NORMS,
    POSITION_ENCODINGS,
    RESIDUAL_NORM_STYLES,
    TOKEN_MIXERS,
    ConfigError,
    HeadConfig,
    ModelConfig,
    StageConfig,
    conv_output_size,
)
from .hierarchical import Trunk, init_weights

logger = logging.getLogger(__name__)

# Attention mechanisms xformers registered that this project does not implement.
XFORMERS_UNSUPPORTED_ATTENTIONS = (
    "blocksparse", "compositional", "favor", "fourier_mix", "global", "lambda", "linformer",
    "local", "nystrom", "ortho", "random", "sparse",
)  # fmt: skip


def check_attention_name(name: object, where: str) -> str:
    if name in TOKEN_MIXERS:
        return str(name)
    if name in XFORMERS_UNSUPPORTED_ATTENTIONS:
        raise ConfigError(
            f"{where}: attention {name!r} is an xformers mechanism that stageformer does not support; "
            f"choose one of {', '.join(TOKEN_MIXERS)}"
        )
    raise ConfigError(f"{where}: unknown attention {name!r}; choose one of {', '.join(TOKEN_MIXERS)}")


def check_feedforward_name(name: object, where: str) -> str:
    if name not in FEEDFORWARD_ALIASES:
        raise ConfigError(f"{where}: unknown feedforward {name!r}; choose one of {', '.join(FEEDFORWARD_ALIASES)}")
    return str(name)


@dataclass(frozen=True)
class BasicLayerConfig:
    """One stage of a hierarchical model, in xformers' terms."""

    embedding: int  # token width of the stage
    attention_mechanism: str  # token mixer name
    patch_size: int  # patch embedding kernel
    stride: int  # patch embedding stride
    padding: int  # patch embedding padding
    seq_len: int  # tokens in the stage; checked against the image size and patch geometry
    feedforward: str  # "MLP" or "Conv2DFeedforward"
    normalization: str = "layernorm"  # one of model.config.NORMS
    repeat_layer: int = 1  # blocks in the stage

    def __post_init__(self) -> None:
        where = f"BasicLayerConfig(embedding={self.embedding})"
        check_attention_name(self.attention_mechanism, where)
        check_feedforward_name(self.feedforward, where)
        if self.normalization not in NORMS:
            raise ConfigError(
                f"{where}: normalization {self.normalization!r} unknown; choose one of {', '.join(NORMS)}"
            )
        for name in ("embedding", "patch_size", "stride", "seq_len", "repeat_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")


def _style_value(style: object) -> str:
    """Accept "pre"/"post"/"deepnorm" or an enum whose value is one of them."""
    value = getattr(style, "value", style)
    if value not in RESIDUAL_NORM_STYLES:
        raise ConfigError(
            f"residual_norm_style {style!r} is not supported; choose one of {', '.join(RESIDUAL_NORM_STYLES)}"
        )
    return str(value)


def get_hierarchical_configuration(
    layer_base_configs: Sequence[BasicLayerConfig],
    residual_norm_style: str = "pre",
    use_rotary_embeddings: bool = True,
    mlp_multiplier: int = 4,
    in_channels: int = 3,
    dim_head: int | None = None,
) -> list[dict[str, Any]]:
    """One xformers block config dict per layer; the first layer of each stage carries the patch
    embedding. Every dict is a separate object, repeated layers included."""
    style = _style_value(residual_norm_style)
    if not layer_base_configs:
        raise ConfigError("get_hierarchical_configuration: give at least one BasicLayerConfig")
    layers: list[dict[str, Any]] = []
    for i, base in enumerate(layer_base_configs):
        if not isinstance(base, BasicLayerConfig):
            raise ConfigError(f"layer_base_configs[{i}] must be a BasicLayerConfig, got {type(base).__name__}")
        num_heads = 1
        if dim_head is not None:
            if base.embedding % dim_head:
                raise ConfigError(
                    f"layer_base_configs[{i}]: embedding {base.embedding} is not a multiple of dim_head {dim_head}"
                )
            num_heads = base.embedding // dim_head
        layer: dict[str, Any] = {
            "block_type": "encoder",
            "dim_model": base.embedding,
            "residual_norm_style": style,
            "normalization": base.normalization,
            "multi_head_config": {
                "num_heads": num_heads,
                "use_rotary_embeddings": use_rotary_embeddings,
                "attention": {"name": base.attention_mechanism},
            },
            "feedforward_config": {
                "name": base.feedforward,
                "activation": "gelu",
                "hidden_layer_multiplier": mlp_multiplier,
                "dropout": 0.0,
            },
            "position_encoding_config": {"name": "learnable", "seq_len": base.seq_len},
            "patch_embedding_config": {
                "in_channels": in_channels,
                "kernel_size": base.patch_size,
                "stride": base.stride,
                "padding": base.padding,
            },
        }
        layers.append(layer)
        repeat = copy.deepcopy(layer)
        del repeat["patch_embedding_config"]
        layers.extend(copy.deepcopy(repeat) for _ in range(base.repeat_layer - 1))
        in_channels = base.embedding
    return layers


# --- reading xformers block configs -------------------------------------------------------------

_LAYER_KEYS = (
    "block_type", "dim_model", "use_triton", "residual_norm_style", "layer_norm_style", "normalization",
    "multi_head_config", "feedforward_config", "position_encoding_config", "patch_embedding_config", "num_layers",
)  # fmt: skip
_MHA_KEYS = ("num_heads", "use_rotary_embeddings", "attention", "residual_dropout", "dim_model", "bias")
_ATTENTION_KEYS = ("name", "dropout", "causal", "seq_len", "dim_model", "pool_size")
_FF_KEYS = ("name", "activation", "hidden_layer_multiplier", "dropout", "dim_model")
_POS_KEYS = ("name", "seq_len", "add_class_token", "dim_model")
_PATCH_KEYS = ("in_channels", "kernel_size", "stride", "padding")
_WEIGHT_INITS = ("vit", "timm", "moco", "small")


def _section(data: object, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a dict, got {type(data).__name__}")
    unknown = [k for k in data if k not in keys]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(keys)}")
    return dict(data)


@dataclass
class _Layer:
    """What one xformers layer dict says, checked."""

    where: str
    dim: int
    style: str
    norm: str
    mixer: str
    heads: int
    rotary: bool
    attn_dropout: float
    pool_size: int
    feedforward: str
    activation: str
    mlp_ratio: float
    dropout: float
    position: str
    seq_len: int | None
    patch: dict[str, int] | None
    count: int


def _read_layer(raw: object, index: int) -> _Layer:
    where = f"stack_configs[{index}]"
    layer = _section(raw, _LAYER_KEYS, where)
    if layer.get("block_type", "encoder") != "encoder":
        raise ConfigError(f"{where}: block_type {layer['block_type']!r} unsupported; hierarchical models are 'encoder'")
    if "dim_model" not in layer:
        raise ConfigError(f"{where}: 'dim_model' is missing")
    style = _style_value(layer.get("residual_norm_style", layer.get("layer_norm_style", "pre")))
    norm = layer.get("normalization", "layernorm")
    if norm not in NORMS:
        raise ConfigError(f"{where}: normalization {norm!r} unknown; choose one of {', '.join(NORMS)}")

    mha = _section(layer.get("multi_head_config", {}), _MHA_KEYS, f"{where}.multi_head_config")
    attention = _section(mha.get("attention", {}), _ATTENTION_KEYS, f"{where}.multi_head_config.attention")
    if "name" not in attention:
        raise ConfigError(f"{where}.multi_head_config.attention: 'name' is missing")
    mixer = check_attention_name(attention["name"], f"{where}.multi_head_config.attention")
    if attention.get("causal", False):
        raise ConfigError(f"{where}: causal attention makes no sense over an image grid; set causal to False")

    ff = _section(layer.get("feedforward_config", {}), _FF_KEYS, f"{where}.feedforward_config")
    feedforward = FEEDFORWARD_ALIASES[check_feedforward_name(ff.get("name", "MLP"), f"{where}.feedforward_config")]
    activation = ff.get("activation", "gelu")
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"{where}.feedforward_config: activation {activation!r} unknown; choose one of {', '.join(ACTIVATIONS)}"
        )

    pos = _section(
        layer.get("position_encoding_config", {"name": "none"}), _POS_KEYS, f"{where}.position_encoding_config"
    )
    position = pos.get("name", "none")
    if position not in POSITION_ENCODINGS:
        raise ConfigError(
            f"{where}.position_encoding_config: name {position!r} unsupported; "
            f"choose one of {', '.join(POSITION_ENCODINGS)}"
        )
    if pos.get("add_class_token", False):
        raise ConfigError(f"{where}: add_class_token is not supported; the head averages the tokens instead")

    patch = None
    if "patch_embedding_config" in layer:
        patch = _section(layer["patch_embedding_config"], _PATCH_KEYS, f"{where}.patch_embedding_config")
        missing = [k for k in _PATCH_KEYS if k not in patch]
        if missing:
            raise ConfigError(f"{where}.patch_embedding_config: missing {', '.join(missing)}")

    return _Layer(
        where=where,
        dim=layer["dim_model"],
        style=style,
        norm=norm,
        mixer=mixer,
        heads=int(mha.get("num_heads", 1)),
        rotary=bool(mha.get("use_rotary_embeddings", False)) and mixer == "scaled_dot_product",
        attn_dropout=float(attention.get("dropout", 0.0)),
        pool_size=int(attention.get("pool_size", 3)),
        feedforward=feedforward,
        activation=activation,
        mlp_ratio=float(ff.get("hidden_layer_multiplier", 4)),
        dropout=float(ff.get("dropout", 0.0)),
        position=position,
        seq_len=pos.get("seq_len"),
        patch=patch,
        count=int(layer.get("num_layers", 1)),
    )


def _stage_signature(layer: _Layer) -> tuple[Any, ...]:
    return (layer.dim, layer.style, layer.norm, layer.mixer, layer.heads, layer.rotary, layer.pool_size,
            layer.feedforward, layer.activation, layer.mlp_ratio, layer.dropout, layer.position)  # fmt: skip


def _infer_image_size(first: _Layer) -> int:
    """The square image side that gives the first stage its seq_len (the stride multiple when it fits)."""
    assert first.patch is not None and first.seq_len is not None
    side = math.isqrt(first.seq_len)
    if side * side != first.seq_len:
        raise ConfigError(f"{first.where}: seq_len {first.seq_len} is not a square number of tokens")
    k, s, p = first.patch["kernel_size"], first.patch["stride"], first.patch["padding"]
    candidates = [side * s, *list(range(max(1, (side - 1) * s + k - 2 * p), side * s + k + 1))]
    for size in candidates:
        if conv_output_size(size, k, s, p) == side:
            return size
    raise ConfigError(
        f"{first.where}: no image size gives a {side}x{side} grid with kernel {k}, stride {s}, padding {p}"
    )


class xFormerConfig:  # noqa: N801 - the xformers name, kept for compatibility
    """A stack of xformers block config dicts, read into a typed ``ModelConfig`` (``.model_config``).

    ``image_size`` is the square input side; when omitted it is inferred from the first stage's
    ``seq_len``. The trunk built from this config has no head (``num_classes=0``); ``create_model``
    adds one. ``weight_init`` is accepted for compatibility; stageformer has one initialisation.
    """

    def __init__(
        self,
        stack_configs: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
        tie_embedding_weights: bool = False,
        weight_init: str = "vit",
        image_size: int | None = None,
    ) -> None:
        if isinstance(stack_configs, Mapping):
            stack_configs = list(stack_configs.values())
        if not isinstance(stack_configs, Sequence) or not stack_configs:
            raise ConfigError("xFormerConfig: stack_configs must be a non-empty list of block config dicts")
        if tie_embedding_weights:
            raise ConfigError("xFormerConfig: tie_embedding_weights applies to text models; leave it False")
        self.stack_configs = [copy.deepcopy(dict(c)) if isinstance(c, Mapping) else c for c in stack_configs]
        self.weight_init = weight_init
        self.model_config = self._read(image_size)

    @property
    def weight_init(self) -> str:
        return self._weight_init

    @weight_init.setter
    def weight_init(self, value: object) -> None:
        value = getattr(value, "value", value)
        if value not in _WEIGHT_INITS:
            raise ConfigError(f"xFormerConfig: weight_init {value!r} unknown; choose one of {', '.join(_WEIGHT_INITS)}")
        self._weight_init = str(value)

    def _read(self, image_size: int | None) -> ModelConfig:
        layers = [_read_layer(raw, i) for i, raw in enumerate(self.stack_configs)]
        if layers[0].patch is None:
            raise ConfigError("stack_configs[0]: the first layer needs a patch_embedding_config to read pixels")
        styles = {layer.style for layer in layers}
        if len(styles) > 1:
            raise ConfigError(f"stack_configs: mixed residual_norm_style {sorted(styles)}; use one for the whole stack")
        positions = {layer.position for layer in layers}
        if len(positions) > 1:
            raise ConfigError(f"stack_configs: mixed position encodings {sorted(positions)}; use one for the stack")

        groups: list[list[_Layer]] = []
        for layer in layers:
            if layer.patch is not None:
                groups.append([layer])
            elif _stage_signature(layer) != _stage_signature(groups[-1][0]):
                raise ConfigError(
                    f"{layer.where}: a layer without patch_embedding_config repeats the stage before it, but its "
                    f"settings differ from {groups[-1][0].where}; give it a patch_embedding_config or the same settings"
                )
            else:
                groups[-1].append(layer)

        in_channels = int(layers[0].patch["in_channels"])
        previous = in_channels
        stages = []
        for group in groups:
            first = group[0]
            assert first.patch is not None
            if first.patch["in_channels"] != previous:
                raise ConfigError(
                    f"{first.where}.patch_embedding_config: in_channels {first.patch['in_channels']} must be "
                    f"{previous}, the width of what comes before"
                )
            if first.mixer == "scaled_dot_product" and (first.heads < 1 or first.dim % first.heads):
                raise ConfigError(
                    f"{first.where}: num_heads {first.heads} must be >= 1 and divide dim_model {first.dim}"
                )
            heads = max(first.heads, 1)
            stages.append(
                StageConfig(
                    dim=first.dim,
                    depth=sum(layer.count for layer in group),
                    mixer=first.mixer,
                    patch_size=first.patch["kernel_size"],
                    stride=first.patch["stride"],
                    padding=first.patch["padding"],
                    feedforward=first.feedforward,
                    mlp_ratio=first.mlp_ratio,
                    activation=first.activation,
                    norm=first.norm,
                    head_dim=max(first.dim // heads, 1),
                    num_heads=None,  # dim // head_dim == heads
                    rotary=first.rotary,
                    pool_size=first.pool_size,
                    dropout=first.dropout,
                )
            )
            previous = first.dim
        style = layers[0].style
        config = ModelConfig(
            stages=tuple(stages),
            image_size=image_size or _infer_image_size(groups[0][0]),
            in_channels=in_channels,
            num_classes=0,
            residual_norm_style=style,
            position_encoding=layers[0].position,
            final_norm=stages[-1].norm if style == "pre" else "skip",
            head=HeadConfig(),
        )
        for group, expected in zip(groups, config.seq_lens(), strict=True):
            for layer in group:
                if layer.seq_len is not None and layer.seq_len != expected:
                    raise ConfigError(
                        f"{layer.where}.position_encoding_config: seq_len {layer.seq_len} does not match the "
                        f"{config.image_size}x{config.image_size} image and the patch geometry; expected {expected}"
                    )
        return config

    def __repr__(self) -> str:
        return f"xFormerConfig({self.model_config!r})"


class xFormer(Trunk):  # noqa: N801 - the xformers name, kept for compatibility
    """The trunk of a hierarchical model: images (B, C, H, W) -> tokens (B, N, C_last)."""

    @classmethod
    def from_config(cls, config: xFormerConfig | ModelConfig) -> xFormer:
        model_config = config.model_config if isinstance(config, xFormerConfig) else config
        trunk = cls(model_config)
        init_weights(trunk, model_config)
        if isinstance(config, xFormerConfig) and config.weight_init != "vit":
            logger.info("weight_init=%r: stageformer initialises every model the same way", config.weight_init)
        return trunk
