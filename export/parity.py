"""The parity gate: an exported graph on ONNX Runtime against the PyTorch model, on the same pixels.

Torch-free: the PyTorch side comes in as a function from a ``uint8 [B, H, W, 3]`` batch to logits, so
this module only makes inputs, runs ONNX Runtime and compares. The inputs are seeded and mix
real-looking images (smooth colour gradients with soft blobs and a little sensor noise), uniform
noise and flat colours, so both typical and extreme pixel statistics are covered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stageformer.core.formats import INPUT_NAME
from stageformer.core.preprocess import PreprocessConfig, normalize

from .options import PARITY_BATCH_SIZES, PARITY_SEED

# Each batch cycles through these kinds, so a batch of 1 holds a real-looking image and larger ones all kinds.
KINDS = ("scene", "noise", "scene", "flat")

Reference = Callable[[np.ndarray], np.ndarray]


def scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A real-looking ``uint8 [size, size, 3]`` image: a colour gradient in a random direction, a few
    soft blobs of other colours, a little noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = start + t[..., None] * (end - start)  # (size, size, 3)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, 1, 2)
        radius = rng.uniform(0.08, 0.35)
        weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))[..., None]
        img = img * (1 - weight) + rng.uniform(0, 255, 3) * weight
    img = img + rng.normal(0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_image(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    if kind == "scene":
        return scene(rng, size)
    if kind == "noise":
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if kind == "flat":
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()
    raise ValueError(f"unknown image kind {kind!r}; choose one of {', '.join(sorted(set(KINDS)))}")


@dataclass(frozen=True)
class ParityBatch:
    pixels: np.ndarray  # uint8 [B, H, W, 3]
    kinds: tuple[str, ...]  # what each image is

    @property
    def batch_size(self) -> int:
        return int(self.pixels.shape[0])


def parity_batches(
    image_size: int, batch_sizes: Sequence[int] = PARITY_BATCH_SIZES, seed: int = PARITY_SEED
) -> list[ParityBatch]:
    """Seeded batches of the given sizes; the same arguments always give the same pixels."""
    rng = np.random.default_rng(seed)
    batches = []
    for b in batch_sizes:
        if b < 1:
            raise ValueError(f"parity batch sizes must be positive, got {b}")
        kinds = tuple(KINDS[i % len(KINDS)] for i in range(b))
        pixels = np.stack([make_image(kind, rng, image_size) for kind in kinds])
        batches.append(ParityBatch(pixels, kinds))
    return batches


def model_input(pixels: np.ndarray, input_format: str, preprocess: PreprocessConfig) -> np.ndarray:
    """What the ONNX graph takes for these pixels: the pixels themselves (raw) or ``normalize``'s output."""
    return pixels if input_format == "raw" else normalize(pixels, preprocess)


@dataclass(frozen=True)
class BatchParity:
    batch_size: int
    kinds: tuple[str, ...]
    max_abs_diff: float
    top1_agreement: float  # fraction of images whose arg-max class is the same on both sides


@dataclass(frozen=True)
class ParityReport:
    """The figures of one comparison; ``to_dict`` is what the ONNX metadata stores."""

    runtime: str  # e.g. "onnxruntime 1.32.0 CPUExecutionProvider"
    reference: str  # e.g. "pytorch 2.13.0 fp32 eval"
    atol: float
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_logit: float  # scale of the logits, to read the difference against
    top1_agreement: float
    batches: tuple[BatchParity, ...] = field(default_factory=tuple)
    seed: int = PARITY_SEED

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.atol

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["batches"] = [asdict(b) for b in self.batches]
        data["passed"] = self.passed
        for key in ("max_abs_diff", "mean_abs_diff", "max_abs_logit"):  # JSON has no inf/nan
            if not np.isfinite(data[key]):
                data[key] = str(data[key])
        return data

    def summary(self) -> str:
        sizes = ", ".join(str(b.batch_size) for b in self.batches)
        verdict = "ok" if self.passed else "FAILED"
        relation = "<=" if self.passed else ">"
        return (
            f"max |diff| {self.max_abs_diff:.3g} {relation} atol {self.atol:g} "
            f"(logits up to {self.max_abs_logit:.3g}), top-1 agreement {self.top1_agreement:.0%}, "
            f"batches {sizes}, {self.runtime}: {verdict}"
        )


def _max_abs(diff: np.ndarray) -> float:
    """Largest difference; NaN counts as infinitely large so that it can never pass."""
    if diff.size == 0:
        return 0.0
    return float("inf") if not np.all(np.isfinite(diff)) else float(diff.max())


def compare(
    run: Callable[[np.ndarray], np.ndarray],
    reference: Reference,
    batches: Sequence[ParityBatch],
    input_format: str,
    preprocess: PreprocessConfig,
    atol: float,
    runtime: str,
    reference_name: str,
    references: Sequence[np.ndarray] | None = None,
) -> ParityReport:
    """Run ``run`` (the ONNX side, on the graph's input) and ``reference`` (on the pixels) on every
    batch and collect the differences. ``references`` reuses logits already computed for ``batches``."""
    per_batch, diffs, agree, scale = [], [], [], 0.0
    for i, batch in enumerate(batches):
        expected = references[i] if references is not None else reference(batch.pixels)
        got = np.asarray(run(model_input(batch.pixels, input_format, preprocess)))
        if got.shape != expected.shape:
            raise ValueError(
                f"the ONNX graph returned shape {list(got.shape)} for a batch of {batch.batch_size}, "
                f"PyTorch {list(expected.shape)}"
            )
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        same = got.argmax(axis=-1) == expected.argmax(axis=-1)
        per_batch.append(BatchParity(batch.batch_size, batch.kinds, _max_abs(diff), float(same.mean())))
        diffs.append(diff.ravel())
        agree.append(same)
        scale = max(scale, float(np.abs(expected).max()) if expected.size else 0.0)
    all_diffs = np.concatenate(diffs)
    return ParityReport(
        runtime=runtime,
        reference=reference_name,
        atol=atol,
        max_abs_diff=_max_abs(all_diffs),
        mean_abs_diff=float(all_diffs.mean()) if np.all(np.isfinite(all_diffs)) else float("inf"),
        max_abs_logit=scale,
        top1_agreement=float(np.concatenate(agree).mean()),
        batches=tuple(per_batch),
    )


def session_runner(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> logits`` through an ``onnxruntime.InferenceSession``."""

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {INPUT_NAME: x})[0])

    return run
