"""Options of ``stageformer train``, declared without importing torch (the work is ``model.train.run``).

The defaults in the help texts of the recipe options are written from ``stageformer.core.recipes`` when
the parser is built, so they follow any change to ``DEFAULT_RECIPE``, ``RECIPES`` or ``FINAL_LR_RATIO``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stageformer.core import recipes

DESCRIPTION = """\
Train a model on an image-folder tree (DIR/train/<class>/*, DIR/val/<class>/*; the class names are the
folder names) or on the built-in 'digits' data set (scikit-learn's handwritten digits rendered as dark
ink on light paper; 20% of each class held out). Recipe: AdamW, linear warmup then cosine decay, label
smoothing, gradient clipping, light augmentation, mixed precision on CUDA. Writes last.safetensors and
best.safetensors (checkpoints with labels and preprocessing), last.state.safetensors (for --resume),
metrics.csv and metrics.png to --out. Several GPUs or nodes: torchrun --nproc_per_node N -m stageformer
train ... (DistributedDataParallel; --batch-size is per process). Demo: stageformer train --preset
digits --data digits --out runs/digits."""


def _shown(value: float) -> str:
    """A recipe value as the help writes it: 30, 0.0005, 1 (not 1.0)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _defaults(name: str) -> str:
    """``(default 30; digits: 30)``: the general recipe's value of the field ``name`` and each preset's,
    as ``stageformer.core.recipes`` holds them when this is called."""
    general = recipes.WORKERS_RULE if name == "workers" else _shown(getattr(recipes.DEFAULT_RECIPE, name))
    parts = [f"default {general}"]
    parts += [f"{preset}: {_shown(getattr(recipe, name))}" for preset, recipe in recipes.RECIPES.items()]
    return "(" + "; ".join(parts).replace("%", "%%") + ")"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``train`` options on ``parser`` (its subcommand parser), in four groups."""
    _add_model_options(parser)
    _add_data_options(parser)
    _add_recipe_options(parser)
    _add_device_options(parser)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (one of --preset, --config, or a checkpoint via --init/--resume)")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help="model preset to train (see `stageformer presets`)")
    source.add_argument("--config", metavar="FILE.json", type=Path, help="model config JSON file to train")
    model.add_argument(
        "--init",
        metavar="CKPT",
        type=Path,
        help="fine-tune: start from this checkpoint's weights; its head is replaced when the number of classes "
        "(or the head's shape) differs. Without --preset/--config the checkpoint's own config is used",
    )
    model.add_argument(
        "--resume",
        metavar="CKPT",
        type=Path,
        help="continue a run from its last.safetensors (with last.state.safetensors beside it): model, optimizer, "
        "schedule, epoch and best accuracy. Options not given again keep the run's values",
    )
    model.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help="input side of the model and its preprocessing (default: the preset's or config's)",
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and output")
    data.add_argument(
        "--data",
        required=True,
        metavar="DIR|digits",
        help="image folder with train/<class>/ and val/<class>/, or 'digits' for the built-in handwritten digits",
    )
    data.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output folder for checkpoints and metrics"
    )
    data.add_argument(
        "--overwrite", action="store_true", help="start a new run even if --out already holds one (it is replaced)"
    )
    data.add_argument(
        "--no-verify-images",
        dest="verify_images",
        action="store_false",
        help="skip reading every image header before training (faster start on huge folders; a bad file is "
        "then reported, with its path, only when it is reached)",
    )
    data.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"data loader worker processes per process {_defaults('workers')}",
    )


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    recipe = parser.add_argument_group("recipe (defaults: the preset's recipe where it has one, else the general one)")
    recipe.add_argument("--epochs", type=int, metavar="N", help=f"passes over the training set {_defaults('epochs')}")
    recipe.add_argument(
        "--batch-size", type=int, metavar="N", help=f"images per step and process {_defaults('batch_size')}"
    )
    recipe.add_argument("--lr", type=float, metavar="LR", help=f"peak learning rate {_defaults('lr')}")
    recipe.add_argument(
        "--weight-decay",
        type=float,
        metavar="WD",
        help=f"AdamW weight decay, not applied to biases, norms and scales {_defaults('weight_decay')}",
    )
    recipe.add_argument(
        "--warmup-epochs",
        type=float,
        metavar="E",
        help=f"linear warmup length in epochs, then cosine decay to {100 * recipes.FINAL_LR_RATIO:g}%% of --lr "
        f"{_defaults('warmup_epochs')}",
    )
    recipe.add_argument(
        "--label-smoothing",
        type=float,
        metavar="S",
        help=f"cross-entropy label smoothing {_defaults('label_smoothing')}",
    )
    recipe.add_argument(
        "--clip-grad",
        type=float,
        metavar="NORM",
        help=f"clip the gradient norm to this, 0 = off {_defaults('clip_grad')}",
    )
    recipe.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation, data order, augmentation (default 0)"
    )


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    device = parser.add_argument_group("device")
    device.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda",
        help="where to train: auto picks cuda when PyTorch sees a GPU (default auto)",
    )
    device.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "fp16", "off"),
        help="mixed precision on CUDA (ignored on CPU): auto = bf16 where supported, else fp16 (default auto)",
    )
    device.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="PyTorch CPU threads per process, 0 = PyTorch's choice; a few stay fast when other programs share "
        f"the CPU {_defaults('threads')}",
    )
    device.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
