"""Command handlers of the model package (``stageformer presets``, ``stageformer import-timm``)."""

from __future__ import annotations

import argparse
import json

import torch

from . import timm_import as timm_import_lib
from .checkpoint import read_metadata
from .config import ModelConfig
from .hierarchical import Classifier
from .presets import get_preset, list_presets


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def preset_rows() -> list[dict[str, object]]:
    """Name, parameter count, input size and description of every preset (built on the meta device,
    so no memory is spent on weights)."""
    rows = []
    for name in list_presets():
        preset = get_preset(name)
        config = preset.config
        with torch.device("meta"):
            params = count_parameters(Classifier(config))
        rows.append(
            {
                "name": name,
                "params": params,
                "input": f"{config.in_channels}x{config.image_size}x{config.image_size}",
                "classes": config.num_classes,
                "description": preset.description,
            }
        )
    return rows


def presets(args: argparse.Namespace) -> int:
    if args.config:
        print(get_preset(args.config).config.to_json(indent=2))
        return 0
    rows = preset_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<26} {'params':>12} {'input':>10} {'classes':>8}  description")
    for row in rows:
        print(f"{row['name']:<26} {row['params']:>12,} {row['input']:>10} {row['classes']:>8}  {row['description']}")
    return 0


def import_timm(args: argparse.Namespace) -> int:
    """Convert timm weights into a checkpoint and print what was read from them."""
    labels = timm_import_lib.read_labels(args.labels) if args.labels else None
    path = timm_import_lib.import_timm(args.model_name, args.weights, args.output, labels)
    metadata = read_metadata(path)
    config = ModelConfig.from_json(metadata["config"])
    family = timm_import_lib.family_of(args.model_name)
    mixers = sorted({s.mixer for s in config.stages})
    print(f"family   {family.name} ({family.description})")
    print(f"depths   {[s.depth for s in config.stages]}")
    print(f"dims     {[s.dim for s in config.stages]}")
    print(f"mixers   {', '.join(mixers)}")
    named = "named" if labels is not None else "numbered"
    print(f"classes  {config.num_classes} ({named} labels), {config.head.kind} head")
    print(f"wrote    {path}")
    return 0
