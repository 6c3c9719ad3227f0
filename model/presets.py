"""Named model presets, each a function returning a ``ModelConfig``, registered by a decorator.

The MetaFormer presets (PoolFormer v1/v2, ConvFormer, CAFormer) reproduce timm's architectures
exactly (same parameter counts, same layer order), so timm's published weights load into them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stageformer.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

from .config import HeadConfig, ModelConfig, StageConfig


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Callable[[], ModelConfig]
    preprocess: PreprocessConfig

    @property
    def config(self) -> ModelConfig:
        return self.build()


_PRESETS: dict[str, Preset] = {}


def register_preset(
    description: str, preprocess: PreprocessConfig
) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    """Register the decorated function under its own name; a second preset of the same name is an error."""

    def decorate(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        name = fn.__name__
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        _PRESETS[name] = Preset(name, description, fn, preprocess)
        return fn

    return decorate


def list_presets() -> list[str]:
    """Names of all registered presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}") from None


def _imagenet(crop_pct: float) -> PreprocessConfig:
    return PreprocessConfig(224, IMAGENET_MEAN, IMAGENET_STD, crop_pct, "bicubic")


# --- MetaFormer families, as timm builds them ---------------------------------------------------


def _metaformer_stages(
    depths: Sequence[int],
    dims: Sequence[int],
    mixers: Sequence[str],
    norms: Sequence[str],
    **common: object,
) -> tuple[StageConfig, ...]:
    """Stem 7/4/2, then 3/2/1 downsampling between stages (none where the width does not change)."""
    stages = []
    for i, (depth, dim, mixer, norm) in enumerate(zip(depths, dims, mixers, norms, strict=True)):
        if i == 0:
            geometry: dict[str, object] = {"patch_size": 7, "stride": 4, "padding": 2}
        elif dim == dims[i - 1]:
            geometry = {"patch_size": None}
        else:
            geometry = {"patch_size": 3, "stride": 2, "padding": 1}
        stages.append(StageConfig(dim=dim, depth=depth, mixer=mixer, norm=norm, **geometry, **common))  # type: ignore[arg-type]
    return tuple(stages)


def poolformer_v1(
    depths: Sequence[int], dims: Sequence[int], layer_scale: float, num_classes: int = 1000
) -> ModelConfig:
    """PoolFormer (v1): pooling mixers, GroupNorm(1), GELU MLPs with biases, layer scale."""
    stages = _metaformer_stages(
        depths, dims, ["pooling"] * len(dims), ["groupnorm"] * len(dims),
        activation="gelu", mlp_bias=True, norm_eps=1e-5, layer_scale=layer_scale,
    )  # fmt: skip
    return ModelConfig(stages, num_classes=num_classes, head=HeadConfig(kind="linear", norm="layernorm", norm_eps=1e-6))


def metaformer_v2(
    depths: Sequence[int],
    dims: Sequence[int],
    mixers: Sequence[str],
    norms: Sequence[str],
    mlp_head: bool,
    num_classes: int = 1000,
) -> ModelConfig:
    """MetaFormer v2 baselines (PoolFormerV2, ConvFormer, CAFormer): StarReLU MLPs without biases,
    bias-free norms (eps 1e-6), residual scales in the last two stages, normed patch embeddings."""
    stages = list(
        _metaformer_stages(
            depths, dims, mixers, norms,
            activation="star_relu", mlp_bias=False, norm_eps=1e-6, attn_bias=False, head_dim=32,
        )
    )  # fmt: skip
    stages = [
        dataclasses.replace(s, res_scale=1.0) if i >= 2 else s  # (None, None, 1.0, 1.0) in timm
        for i, s in enumerate(stages)
    ]
    head = HeadConfig(kind="mlp" if mlp_head else "linear", norm="layernorm", norm_eps=1e-6, activation="squared_relu")
    return ModelConfig(tuple(stages), num_classes=num_classes, embed_norm="layernorm_nobias", head=head)


_S12 = ((2, 2, 6, 2), (64, 128, 320, 512))
_S18 = ((3, 3, 9, 3), (64, 128, 320, 512))


@register_preset("PoolFormer-S12 (timm poolformer_s12)", _imagenet(0.9))
def poolformer_s12() -> ModelConfig:
    return poolformer_v1(*_S12, layer_scale=1e-5)


@register_preset("PoolFormer-S24 (timm poolformer_s24)", _imagenet(0.9))
def poolformer_s24() -> ModelConfig:
    return poolformer_v1((4, 4, 12, 4), (64, 128, 320, 512), layer_scale=1e-5)


@register_preset("PoolFormer-S36 (timm poolformer_s36)", _imagenet(0.9))
def poolformer_s36() -> ModelConfig:
    return poolformer_v1((6, 6, 18, 6), (64, 128, 320, 512), layer_scale=1e-6)


@register_preset("PoolFormer-M36 (timm poolformer_m36)", _imagenet(0.95))
def poolformer_m36() -> ModelConfig:
    return poolformer_v1((6, 6, 18, 6), (96, 192, 384, 768), layer_scale=1e-6)


@register_preset("PoolFormer-M48 (timm poolformer_m48)", _imagenet(0.95))
def poolformer_m48() -> ModelConfig:
    return poolformer_v1((8, 8, 24, 8), (96, 192, 384, 768), layer_scale=1e-6)


@register_preset("PoolFormerV2-S12 (timm poolformerv2_s12)", _imagenet(1.0))
def poolformerv2_s12() -> ModelConfig:
    return metaformer_v2(*_S12, ["pooling"] * 4, ["groupnorm_nobias"] * 4, mlp_head=False)


@register_preset("ConvFormer-S18 (timm convformer_s18)", _imagenet(1.0))
def convformer_s18() -> ModelConfig:
    return metaformer_v2(*_S18, ["sepconv"] * 4, ["layernorm_nobias"] * 4, mlp_head=True)


@register_preset("CAFormer-S18 (timm caformer_s18)", _imagenet(1.0))
def caformer_s18() -> ModelConfig:
    mixers = ["sepconv", "sepconv", "scaled_dot_product", "scaled_dot_product"]
    return metaformer_v2(*_S18, mixers, ["layernorm_nobias"] * 4, mlp_head=True)


# --- the xformers examples ----------------------------------------------------------------------


@register_preset("xformers' hierarchical example: 3 attention stages 64/128/320 at 224x224", _imagenet(0.875))
def seed_metaformer() -> ModelConfig:
    geometry = [(64, 7, 4, 2), (128, 3, 2, 1), (320, 3, 2, 1)]
    stages = tuple(
        StageConfig(dim=d, mixer="scaled_dot_product", patch_size=k, stride=s, padding=p, head_dim=32)
        for d, k, s, p in geometry
    )
    return ModelConfig(stages, image_size=224, position_encoding="learnable", final_norm="layernorm")


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@register_preset(
    "xformers' CIFAR MetaFormer: 4 attention stages 64/128/320/512 at 32x32, rotary",
    PreprocessConfig(32, CIFAR_MEAN, CIFAR_STD, 1.0, "bicubic"),
)
def xformers_cifar_metaformer() -> ModelConfig:
    stages = tuple(
        StageConfig(dim=d, mixer="scaled_dot_product", patch_size=3, stride=2, padding=1, head_dim=32, rotary=True)
        for d in (64, 128, 320, 512)
    )
    return ModelConfig(stages, image_size=32, num_classes=10, position_encoding="learnable", final_norm="layernorm")


# --- small models -------------------------------------------------------------------------------


@register_preset(
    "tiny test model: every token mixer, a stage without patch embedding, 32x32",
    PreprocessConfig(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear"),
)
def tiny() -> ModelConfig:
    stages = (
        StageConfig(dim=16, mixer="pooling", patch_size=7, stride=4, padding=2, norm="groupnorm", layer_scale=1e-2),
        StageConfig(dim=24, mixer="visual"),
        StageConfig(dim=24, mixer="sepconv", patch_size=None, activation="star_relu", res_scale=1.0),
        StageConfig(dim=32, mixer="scaled_dot_product", head_dim=8, rotary=True, feedforward="conv2d"),
        StageConfig(dim=32, mixer="identity", patch_size=None, activation="squared_relu", norm="layernorm_nobias"),
    )
    return ModelConfig(stages, image_size=32, num_classes=10, position_encoding="sine", final_norm="layernorm")


@register_preset(
    "demo model for digits as people send them (typed, handwritten, drawn; either polarity), 24x24",
    PreprocessConfig(24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear"),
)
def digits() -> ModelConfig:
    # Separable-convolution stages on 12x12 and 6x6 tokens read the strokes (convolutions learn far more
    # from small images than pooling or attention do there); attention on 3x3 relates the parts. 24x24
    # keeps a thin stroke visible and costs 0.2 ms a picture on one core. Trained on the `digits` data
    # with stageformer.core.recipes.RECIPES["digits"]; docs/training.md ("The demo model") has its figures.
    stages = (
        StageConfig(dim=32, mixer="sepconv", kernel_size=5, patch_size=3, stride=2, padding=1, mlp_ratio=2.0),
        StageConfig(dim=64, mixer="sepconv", kernel_size=5),
        StageConfig(dim=96, depth=2, mixer="scaled_dot_product", head_dim=16),
    )
    return ModelConfig(stages, image_size=24, num_classes=10, position_encoding="learnable", final_norm="layernorm")
