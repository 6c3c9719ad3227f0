"""Polarity and framing of the demo's digits: learned from augmentation, or normalised in the graph?

Trains the ``digits`` preset on the ``digits`` data several ways, with the same data, seed and
schedule, and compares them on the held-out sets of ``model.digits_eval``:

- ``augment``: the model alone; light-on-dark digits and digits of any size and place in the
  picture are in the training data (``model.digits.DigitAugment``), so the model learns them.
- ``polarity``: a ``PolarityNorm`` in front of the model turns light-on-dark input into dark-on-light.
- ``framing``: a ``FramingNorm`` in front of the model cuts the ink's bounding box out of the input
  and scales it to fill the frame.

Both modules work on the model's input tensor, so they would sit in the exported ONNX graph (its ops:
reductions, comparisons, ``GridSample``); nothing changes on the server. The loop is ``model.train``'s
recipe written out (same optimizer groups, schedule, seeds and data order: the first epoch's loss is the
same to the last digit), so ``--baseline`` can score a checkpoint of ``stageformer train --preset digits
--data digits`` as the ``augment`` row instead of training it again. Run::

    python -m model.digits_study --out runs/digits-study --baseline runs/digits/last.safetensors

It writes ``results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from stageformer.core.preprocess import PreprocessConfig, normalize
from stageformer.core.recipes import RECIPES

from .checkpoint import load_checkpoint
from .data import Collate, EpochSampler, ImageDataset, load_data
from .digits_eval import Case, accuracy_by_source, held_out_cases, predictions
from .hierarchical import Classifier
from .presets import get_preset
from .train import build_optimizer, learning_rate

log = logging.getLogger(__name__)


def _dark_ink(gray: Tensor) -> Tensor:
    """Per image of ``gray`` (B, H, W), whether the ink is darker than the ground: the image's mean (mostly
    ground) lies nearer its brightest pixel than its darkest. Unlike the border's mean, this holds under
    a shadow or uneven light across a photographed page."""
    low, high, mean = gray.amin(dim=(1, 2)), gray.amax(dim=(1, 2)), gray.mean(dim=(1, 2))
    return (high - mean) < (mean - low)


class PolarityNorm(nn.Module):
    """Light ink on a dark ground -> dark on light, by negating the normalised input (mean 0.5 and
    std 0.5 make ``255 - v`` exactly ``-x``) when the ink is not the darker side (``_dark_ink``)."""

    def forward(self, x: Tensor) -> Tensor:
        flip = ~_dark_ink(x.mean(dim=1))
        return torch.where(flip[:, None, None, None], -x, x)


class FramingNorm(nn.Module):
    """Cut out the ink's bounding box (pixels on the ink's side of the mean by over half the largest
    such difference), widen it to a square with a margin, and resample it to the full input (bilinear);
    outside the picture, the mean."""

    def __init__(self, margin: float = 1.25, smallest: float = 6.0) -> None:
        super().__init__()
        self.margin, self.smallest = margin, smallest

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        gray = x.mean(dim=1)
        ground = gray.mean(dim=(1, 2))
        sign = torch.where(_dark_ink(gray), -1.0, 1.0)[:, None, None]
        ink = (gray - ground[:, None, None]) * sign
        mask = ink > 0.5 * ink.amax(dim=(1, 2), keepdim=True).clamp_min(1e-3)
        top, bottom = _extent(mask.any(dim=2))
        left, right = _extent(mask.any(dim=1))
        side = torch.maximum(bottom - top, right - left).mul(self.margin).clamp_min(self.smallest)
        cy, cx = (top + bottom) / 2, (left + right) / 2
        theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0], theta[:, 1, 1] = side / w, side / h
        theta[:, 0, 2], theta[:, 1, 2] = 2 * cx / w - 1, 2 * cy / h - 1
        grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
        shifted = x - ground[:, None, None, None]
        return F.grid_sample(shifted, grid, align_corners=False) + ground[:, None, None, None]


def _extent(hit: Tensor) -> tuple[Tensor, Tensor]:
    """First index and one past the last index where ``hit`` (B, N) is true; the whole range when none is."""
    n = hit.shape[1]
    index = torch.arange(n, device=hit.device, dtype=torch.float32).expand_as(hit)
    first = torch.where(hit, index, torch.full_like(index, n)).amin(dim=1)
    last = torch.where(hit, index, torch.full_like(index, -1)).amax(dim=1) + 1
    empty = ~hit.any(dim=1)
    return torch.where(empty, torch.zeros_like(first), first), torch.where(empty, torch.full_like(last, n), last)


VARIANTS: dict[str, Callable[[], nn.Module]] = {
    "augment": nn.Identity,
    "polarity": PolarityNorm,
    "framing": FramingNorm,
}


def train_variant(name: str, args: argparse.Namespace, config: PreprocessConfig) -> nn.Module:
    """The preset with the variant's module in front, trained on the digits; returned in eval mode."""
    torch.manual_seed(args.seed)
    model = nn.Sequential(VARIANTS[name](), Classifier(get_preset("digits").config))
    splits = load_data("digits", config)
    data = ImageDataset(splits.train, config, splits.augment, seed=args.seed)
    sampler = EpochSampler(DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=args.seed))
    loader = DataLoader(
        data, args.batch_size, sampler=sampler, num_workers=1, collate_fn=Collate(config), persistent_workers=True
    )
    recipe = RECIPES["digits"]
    optimizer = build_optimizer(model, recipe)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    total, warmup, step = args.epochs * len(loader), round(recipe.warmup_epochs * len(loader)), 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, warmup, args.lr)
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
            optimizer.step()
            step, loss_sum, seen = step + 1, loss_sum + loss.item() * len(labels), seen + len(labels)
        log.info("%s: epoch %d/%d loss %.4f (%.0f s)", name, epoch + 1, args.epochs, loss_sum / seen,
                 time.perf_counter() - started)  # fmt: skip
    return model.eval()


def score(model: nn.Module, cases: list[Case], config: PreprocessConfig) -> dict[str, float]:
    def predict(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(normalize(pixels, config))).argmax(dim=1).numpy()

    return accuracy_by_source(cases, predictions(predict, cases, config))


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per variant, one column per held-out set, accuracy in percent."""
    columns = sorted({k for r in results.values() for k in r["accuracy"]})
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, result in results.items():
        cells = [f"{100 * result['accuracy'][c]:.1f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.digits_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--baseline", type=Path, help="a digits checkpoint to score as the augment variant")
    parser.add_argument("--epochs", type=int, default=RECIPES["digits"].epochs)
    parser.add_argument("--batch-size", type=int, default=RECIPES["digits"].batch_size)
    parser.add_argument("--lr", type=float, default=RECIPES["digits"].lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    config = get_preset("digits").preprocess
    cases = held_out_cases(config)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    if args.baseline is not None:
        baseline = load_checkpoint(args.baseline).model
        results["augment"] = {"accuracy": score(baseline, cases, config), "checkpoint": str(args.baseline)}
    for name in args.variants.split(","):
        if name in results:
            continue
        started = time.perf_counter()
        model = train_variant(name, args, config)
        seconds = time.perf_counter() - started
        results[name] = {"accuracy": score(model, cases, config), "train_seconds": round(seconds, 1)}
        torch.save(model.state_dict(), args.out / f"{name}.pt")
        (args.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        log.info("%s done in %.0f s", name, seconds)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
