"""What decoding costs, and what reduced-scale decoding changes in the model's input.

Three ways from JPEG bytes to the model's ``uint8 [H, W, 3]`` input, each timed on one thread:

- ``exact``: ``service.images.prepare`` decoding every pixel (``--decode exact``), the reference;
- ``fast``: the same with reduced-scale decoding down to ``--decode-oversample`` times the resize target
  (``--decode fast``, the server's default);
- ``plain (own decode)``: the idiomatic peer's ``draft()`` + resize (``bench.peers.fastapi_own_decode``).

Each way that is not the reference is compared with it image by image: PSNR (dB, over all pixels and channels)
and the largest absolute difference of one pixel value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.engine import measure
from bench.images import ImageSet
from stageformer.core.preprocess import PreprocessConfig

MAX_PIXELS = 40_000_000  # the server's default limit
EXACT, FAST, OWN = "exact", "fast", "plain (own decode)"


def decoders(config: PreprocessConfig, oversample: float) -> dict[str, Callable[[bytes], np.ndarray]]:
    """The three ways, by name."""
    from dataclasses import asdict

    from bench.peers.fastapi_own_decode import pixel_loader
    from service.images import prepare

    return {
        EXACT: lambda data: prepare(data, config, MAX_PIXELS),
        FAST: lambda data: prepare(data, config, MAX_PIXELS, oversample=oversample),
        OWN: pixel_loader(asdict(config)),
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays in dB; ``inf`` when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def compare(got: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, Any]:
    """PSNR and largest |difference| of ``got`` against ``reference``, image by image. JSON has no infinity: equal
    images count in ``identical`` and are left out of the PSNR figures (None when all are equal)."""
    values = [psnr(g, r) for g, r in zip(got, reference, strict=True)]
    finite = [v for v in values if math.isfinite(v)]
    diffs = (np.abs(g.astype(np.int16) - r.astype(np.int16)) for g, r in zip(got, reference, strict=True))
    max_abs = max(int(d.max()) for d in diffs)
    return {
        "images": len(values),
        "identical": len(values) - len(finite),
        "psnr_min_db": min(finite) if finite else None,
        "psnr_mean_db": sum(finite) / len(finite) if finite else None,
        "max_abs": max_abs,
    }


def study(
    sets: dict[str, ImageSet], config: PreprocessConfig, oversample: float = 2.0, budget_s: float = 1.0
) -> dict[str, Any]:
    """Per image set: ms per image of each way, and each way's difference from the exact one."""
    ways = decoders(config, oversample)
    out: dict[str, Any] = {"oversample": oversample, "resize_to": config.resize_size, "sets": {}}
    for label, images in sets.items():
        outputs = {name: [decode(j) for j in images.jpegs] for name, decode in ways.items()}
        timings = {name: _ms_per_image(decode, images, budget_s) for name, decode in ways.items()}
        out["sets"][label] = {
            "source": images.source,
            "sizes": sorted({f"{w}x{h}" for w, h in images.sizes}),
            "ms_per_image": timings,
            "vs_exact": {name: compare(outputs[name], outputs[EXACT]) for name in ways if name != EXACT},
        }
    return out


def _ms_per_image(decode: Callable[[bytes], np.ndarray], images: ImageSet, budget_s: float) -> float:
    def call() -> None:
        for jpeg in images.jpegs:
            decode(jpeg)

    return 1000.0 / measure(call, len(images.jpegs), budget_s).images_per_s
