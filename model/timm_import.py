"""Import timm's published MetaFormer weights (PoolFormer v1/v2, ConvFormer, CAFormer) as a checkpoint.

timm's ``model.safetensors`` holds a bare state_dict with timm's names and no config. The family comes
from the timm model name; depths, widths, attention stages, scales, head kind and class count come
from the tensors, so any depth and width of the four families loads. The tensors are then renamed
onto our layout (tokens are ``(B, N, C)`` here, so timm's 1x1 convolutions become linear layers) and
written as a stageformer checkpoint with the family's pretrained preprocessing.

Only safetensors files are read: pickled ``.pth`` / ``.bin`` weights are refused, never unpickled.
What this cannot do: import other timm architectures, or weights whose layout differs from timm's
``MetaFormer`` (e.g. the original PoolFormer repository's names, or a training state with an
optimizer); convert those to timm's layout first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from stageformer.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

from .checkpoint import CheckpointError, describe_mismatch, save_checkpoint
from .config import ModelConfig
from .hierarchical import Classifier
from .presets import metaformer_v2, poolformer_v1

logger = logging.getLogger(__name__)


class TimmImportError(CheckpointError):
    """timm weights cannot be imported; the message names the first offending tensors or the bad input."""


# --- families -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A timm MetaFormer family: the model-name prefix that selects it and its fixed settings."""

    name: str  # our identifier, also written to the checkpoint's metadata
    prefix: str  # timm model names of this family start with it
    description: str
    mixers: str  # "pooling", "sepconv", or "sepconv+attention" (attention where the tensors say so)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # Longer prefixes first: "poolformerv2_" must not be read as "poolformer_".
        Family("poolformer_v2", "poolformerv2_", "PoolFormer v2 (poolformerv2_s12, ...)", "pooling"),
        Family("poolformer_v1", "poolformer_", "PoolFormer v1 (poolformer_s12, ..., poolformer_m48)", "pooling"),
        Family("convformer", "convformer_", "ConvFormer (convformer_s18, ...)", "sepconv"),
        Family("caformer", "caformer_", "CAFormer (caformer_s18, ...)", "sepconv+attention"),
    )
}


def _base_name(model_name: str) -> str:
    """``hf-hub:timm/poolformer_s12.sail_in1k`` -> ``poolformer_s12``."""
    name = model_name.strip()
    for scheme in ("hf-hub:", "hf_hub:"):
        name = name.removeprefix(scheme)
    name = name.rsplit("/", 1)[-1]  # a hub repository id "timm/NAME.TAG"
    return name.split(".", 1)[0].lower()  # a pretrained tag ".sail_in1k"


def family_of(model_name: str) -> Family:
    """The family of a timm model name (a pretrained tag or hub prefix is allowed and ignored)."""
    base = _base_name(model_name)
    for family in FAMILIES.values():
        if base.startswith(family.prefix):
            return family
    known = "; ".join(f"{f.prefix}* = {f.description}" for f in FAMILIES.values())
    raise TimmImportError(
        f"{model_name!r} is not a timm MetaFormer model this importer knows; the model name must start with "
        f"one of the family prefixes ({known})"
    )


def pretrained_preprocess(model_name: str) -> PreprocessConfig:
    """timm's pretrained preprocessing of the model: 224 pixels, ImageNet mean/std, bicubic, and a
    centre crop of 0.9 (PoolFormer s*), 0.95 (PoolFormer m*) or 1.0 (v2, ConvFormer, CAFormer)."""
    family = family_of(model_name)
    crop_pct = 1.0
    if family.name == "poolformer_v1":
        crop_pct = 0.95 if _base_name(model_name).removeprefix(family.prefix).startswith("m") else 0.9
    return PreprocessConfig(224, IMAGENET_MEAN, IMAGENET_STD, crop_pct, "bicubic")


# --- reading timm's tensors ---------------------------------------------------------------------


def load_timm_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on CPU). Pickled files are refused, not unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"timm weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as exc:
        raise TimmImportError(
            f"{path} is not a safetensors file ({exc}); download timm's model.safetensors "
            "(pickled .pth/.bin files are never loaded)"
        ) from exc


_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")


def _blocks(state_dict: Mapping[str, torch.Tensor]) -> dict[int, dict[int, set[str]]]:
    """stage index -> block index -> the tensor names inside that block (``norm1.weight``, ...)."""
    found: dict[int, dict[int, set[str]]] = {}
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            found.setdefault(int(m[1]), {}).setdefault(int(m[2]), set()).add(m[3])
    return found


def _stage_width(state_dict: Mapping[str, torch.Tensor], stage: int, blocks: Mapping[int, set[str]]) -> int:
    """The width of a stage, read from the first tensor of its blocks whose first axis is the width."""
    for suffix in ("norm1.weight", "norm2.weight", "mlp.fc2.weight", "mlp.fc2.bias", "layer_scale1.scale"):
        for j in sorted(blocks):
            if suffix in blocks[j]:
                return int(state_dict[f"stages.{stage}.blocks.{j}.{suffix}"].shape[0])
    raise TimmImportError(
        f"cannot tell the width of stage {stage}: none of its blocks has norm1.weight, norm2.weight or "
        f"mlp.fc2.weight (e.g. stages.{stage}.blocks.0.norm1.weight); is this a timm MetaFormer state_dict?"
    )


def config_from_timm_state_dict(family: str | Family, state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Our ``ModelConfig`` for a timm state_dict of ``family`` (a name of ``FAMILIES`` or a ``Family``).

    Depths and widths come from ``stages.{i}.blocks.{j}.*``, the class count and head kind from
    ``head.fc.*`` (no ``head.fc`` tensors: ``num_classes=0``), CAFormer's attention stages from
    ``token_mixer.qkv``, and layer / residual scales from their presence per stage. Everything else is
    the family's fixed setting. Tensors this config has no place for are reported by ``convert_state_dict``.
    """
    if isinstance(family, str):
        if family not in FAMILIES:
            raise TimmImportError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
        family = FAMILIES[family]
    stage_blocks = _blocks(state_dict)
    if not stage_blocks:
        raise TimmImportError(
            "no tensors named stages.{i}.blocks.{j}.* found; this is not a timm MetaFormer state_dict "
            f"(first keys: {', '.join(list(state_dict)[:5]) or 'none'})"
        )
    num_stages = max(stage_blocks) + 1
    missing_stages = [i for i in range(num_stages) if i not in stage_blocks]
    if missing_stages:
        raise TimmImportError(f"stages {missing_stages} have no blocks (no stages.{missing_stages[0]}.blocks.* keys)")
    depths = [max(stage_blocks[i]) + 1 for i in range(num_stages)]
    dims = [_stage_width(state_dict, i, stage_blocks[i]) for i in range(num_stages)]

    mlp_classifier = [state_dict[k] for k in ("head.fc.fc2.weight", "head.fc.fc2.bias") if k in state_dict]
    linear_classifier = [state_dict[k] for k in ("head.fc.weight", "head.fc.bias") if k in state_dict]
    mlp_head = bool(mlp_classifier) or any(k.startswith("head.fc.fc1.") for k in state_dict)
    classifier = mlp_classifier or linear_classifier
    num_classes = int(classifier[0].shape[0]) if classifier else 0  # timm's num_classes=0: no head.fc

    def stage_has(i: int, *suffixes: str) -> bool:
        return any(s in names for names in stage_blocks[i].values() for s in suffixes)

    if family.name == "poolformer_v1":
        if mlp_head:
            raise TimmImportError(
                "the weights have an MLP head (head.fc.fc1.*), which PoolFormer v1 never has; "
                "are these ConvFormer/CAFormer weights? pick the timm model name they belong to"
            )
        config = poolformer_v1(depths, dims, layer_scale=1e-5, num_classes=num_classes)
    else:
        if family.mixers == "pooling":
            mixers = ["pooling"] * num_stages
            norms = ["groupnorm_nobias"] * num_stages
        else:
            attention = family.mixers == "sepconv+attention"
            mixers = [
                "scaled_dot_product" if attention and stage_has(i, "token_mixer.qkv.weight") else "sepconv"
                for i in range(num_stages)
            ]
            norms = ["layernorm_nobias"] * num_stages
        config = metaformer_v2(depths, dims, mixers, norms, mlp_head=mlp_head, num_classes=num_classes)

    # Layer and residual scales where the tensors have them (timm: None -> no scale module).
    stages = []
    for i, stage in enumerate(config.stages):
        layer_scale = stage.layer_scale or 1e-5  # any value: the weights overwrite it
        has_layer_scale = stage_has(i, "layer_scale1.scale", "layer_scale2.scale")
        has_res_scale = stage_has(i, "res_scale1.scale", "res_scale2.scale")
        stages.append(
            dataclasses.replace(
                stage, layer_scale=layer_scale if has_layer_scale else None, res_scale=1.0 if has_res_scale else None
            )
        )
    return dataclasses.replace(config, stages=tuple(stages))


# --- renaming onto our layout -------------------------------------------------------------------

# Our name -> timm's name; the first matching rule wins.
_RENAME: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), template)
    for pattern, template in (
        (r"^trunk\.stages\.0\.embed\.proj\.", "stem.conv."),
        (r"^trunk\.stages\.0\.embed\.post_norm\.", "stem.norm."),
        (r"^trunk\.stages\.(\d+)\.embed\.proj\.", r"stages.\1.downsample.conv."),
        (r"^trunk\.stages\.(\d+)\.embed\.pre_norm\.", r"stages.\1.downsample.norm."),
        (r"^trunk\.stages\.(\d+)\.blocks\.(\d+)\.mixer\.act\.", r"stages.\1.blocks.\2.token_mixer.act1."),
        (r"^trunk\.stages\.(\d+)\.blocks\.(\d+)\.mixer\.", r"stages.\1.blocks.\2.token_mixer."),
        (r"^trunk\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.", r"stages.\1.blocks.\2.mlp."),
        (r"^trunk\.stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.blocks.\2."),
        (r"^head_norm\.", "head.norm."),
        (r"^head\.", "head.fc."),
    )
)


def timm_key(our_key: str) -> str:
    """timm's name of one of our tensors, e.g. ``trunk.stages.0.embed.proj.weight`` -> ``stem.conv.weight``."""
    for pattern, template in _RENAME:
        if pattern.match(our_key):
            return pattern.sub(template, our_key, count=1)
    raise TimmImportError(f"our tensor {our_key!r} has no counterpart in timm's MetaFormer")


def _fit(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``tensor`` in ``shape``: as is, or a 1x1 convolution (out, in, 1, 1) as a linear weight (out, in)."""
    if tuple(tensor.shape) == shape:
        return tensor
    if tensor.ndim == 4 and len(shape) == 2 and tuple(tensor.shape) == (*shape, 1, 1):
        return tensor.reshape(shape)
    return None


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str = "timm state_dict"
) -> dict[str, torch.Tensor]:
    """timm's tensors renamed and reshaped for ``model`` (built from ``config_from_timm_state_dict``).

    Every tensor of ``model`` must be present with the right shape and every timm tensor must be used;
    otherwise a ``TimmImportError`` names the first missing, unexpected and mis-shaped tensors in timm's
    names, so they can be found in the file.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = {k: timm_key(k) for k in expected}  # ours -> timm's
    used = set(names.values())
    missing = [t for t in names.values() if t not in state_dict]
    unexpected = [t for t in state_dict if t not in used]
    converted: dict[str, torch.Tensor] = {}
    wrong = []
    for ours, theirs in names.items():
        if theirs not in state_dict:
            continue
        tensor = _fit(state_dict[theirs], expected[ours])
        if tensor is None:
            wrong.append(f"{theirs} has shape {tuple(state_dict[theirs].shape)}, expected {expected[ours]}")
        else:
            converted[ours] = tensor
    problems = describe_mismatch(missing, unexpected, wrong)
    if problems:
        raise TimmImportError(
            f"{source} does not fit the model read from its tensors: {problems} "
            "(weights of another timm model or family? the model name picks the family)"
        )
    return converted


# --- labels -------------------------------------------------------------------------------------


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a file: a JSON list of strings, or one label per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TimmImportError(f"labels file {path} looks like JSON but does not parse: {exc}") from exc
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise TimmImportError(f"labels file {path}: JSON labels must be a list of strings, in class order")
        return list(data)
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- the whole import ---------------------------------------------------------------------------


def import_timm(
    model_name: str,
    weights_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
) -> Path:
    """Convert timm's ``model.safetensors`` of ``model_name`` into a stageformer checkpoint at
    ``output_path`` with the family's pretrained preprocessing and ``labels`` (numbered when omitted).
    Returns the checkpoint's path. Nothing is written when any check fails."""
    family = family_of(model_name)
    preprocess = pretrained_preprocess(model_name)
    state_dict = load_timm_state_dict(weights_path)
    config = config_from_timm_state_dict(family, state_dict)
    if labels is not None and len(labels) != config.num_classes:
        raise TimmImportError(
            f"{len(labels)} labels given, but the weights have {config.num_classes} classes; "
            "give one label per class, in class order"
        )
    model = Classifier(config)
    tensors = convert_state_dict(state_dict, model, source=f"{weights_path} ({model_name}, {family.name})")
    model.load_state_dict(tensors, strict=True)
    model.eval()
    path = save_checkpoint(
        model,
        output_path,
        preprocess,
        labels,
        extra={"source": "timm", "timm_model": model_name, "timm_family": family.name},
    )
    logger.info(
        "imported %s (%s): depths %s, dims %s, %d classes -> %s",
        model_name, family.name, [s.depth for s in config.stages], [s.dim for s in config.stages],
        config.num_classes, path,
    )  # fmt: skip
    return path
