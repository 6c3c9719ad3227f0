"""The parity inputs and the comparison, without torch or ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.parity import KINDS, compare, make_image, parity_batches
from stageformer.core.preprocess import PreprocessConfig, normalize


def test_batches_are_seeded_mixed_and_uint8() -> None:
    batches = parity_batches(24, [1, 3, 8])
    assert [b.batch_size for b in batches] == [1, 3, 8]
    assert batches[0].kinds == ("scene",) and batches[1].kinds == ("scene", "noise", "scene")
    assert set(batches[2].kinds) == set(KINDS)
    for b in batches:
        assert b.pixels.dtype == np.uint8 and b.pixels.shape == (b.batch_size, 24, 24, 3)
    again = parity_batches(24, [1, 3, 8])
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(batches, again, strict=True))
    assert not np.array_equal(parity_batches(24, [3], seed=1)[0].pixels, batches[1].pixels)


def test_scenes_look_like_photos_not_noise() -> None:
    rng = np.random.default_rng(0)
    scene = make_image("scene", rng, 64).astype(np.float64)
    noise = make_image("noise", rng, 64).astype(np.float64)
    # neighbouring pixels of a real-looking image are close; of noise, far apart
    assert np.abs(np.diff(scene, axis=1)).mean() < 6 < np.abs(np.diff(noise, axis=1)).mean()
    assert scene.std() > 10  # but the image is not flat
    flat = make_image("flat", rng, 8)
    assert (flat == flat[0, 0]).all()
    with pytest.raises(ValueError, match="unknown image kind"):
        make_image("photo", rng, 8)


def _linear(pixels: np.ndarray) -> np.ndarray:
    return normalize(pixels, PreprocessConfig(8)).reshape(len(pixels), -1)[:, :4].astype(np.float32)


def test_compare_reports_and_gates() -> None:
    batches = parity_batches(8, [1, 3])
    config = PreprocessConfig(8)
    same = compare(lambda x: _linear(x), _linear, batches, "raw", config, 1e-4, "rt", "ref")
    assert same.passed and same.max_abs_diff == 0 and same.top1_agreement == 1.0
    shifted = compare(lambda x: _linear(x) + 1e-3, _linear, batches, "raw", config, 1e-4, "rt", "ref")
    assert not shifted.passed and shifted.max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    assert "FAILED" in shifted.summary() and [b.batch_size for b in shifted.batches] == [1, 3]


def test_nan_never_passes_and_serialises() -> None:
    batches = parity_batches(8, [2])
    nan = compare(lambda x: np.full((len(x), 4), np.nan, np.float32), _linear, batches, "raw", PreprocessConfig(8),
                  1e9, "rt", "ref")  # fmt: skip
    assert not nan.passed and nan.max_abs_diff == float("inf")
    assert json.loads(json.dumps(nan.to_dict()))["max_abs_diff"] == "inf"


def test_normalized_input_gets_normalize_output() -> None:
    batches = parity_batches(8, [2])
    seen = []
    compare(lambda x: seen.append(x) or _linear(batches[0].pixels), _linear, batches, "normalized",
            PreprocessConfig(8), 1e-4, "rt", "ref")  # fmt: skip
    np.testing.assert_array_equal(seen[0], normalize(batches[0].pixels, PreprocessConfig(8)))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="returned shape"):
        compare(lambda x: np.zeros((1, 4), np.float32), _linear, parity_batches(8, [2]), "raw", PreprocessConfig(8),
                1e-4, "rt", "ref")  # fmt: skip
