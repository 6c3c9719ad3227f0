"""The shared preprocessing function: geometry, colour modes, and no torch anywhere near it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stageformer.core.preprocess import (
    INTERPOLATIONS,
    PreprocessConfig,
    normalize,
    preprocess,
    reduce_while_decoding,
    stack,
)


def test_short_side_resize_then_centre_crop() -> None:
    config = PreprocessConfig(image_size=32, crop_pct=0.5, interpolation="nearest")
    image = Image.new("RGB", (128, 64), (0, 0, 0))
    image.paste((255, 0, 0), (48, 16, 80, 48))  # a red square in the middle, 32x32
    out = preprocess(image, config)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # short side 64 -> 64 (image_size / crop_pct), crop keeps the central 32x32: the red square
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all()


def _resize_all_then_crop(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """The reference: resize the whole image so its short side is resize_size, then crop the centre."""
    scale = config.resize_size / min(image.size)
    width, height = (max(config.resize_size, round(side * scale)) for side in image.size)
    left, top = (width - config.image_size) // 2, (height - config.image_size) // 2
    resized = image.resize((width, height), INTERPOLATIONS[config.interpolation])
    return np.asarray(resized.crop((left, top, left + config.image_size, top + config.image_size)))


@pytest.mark.parametrize("interpolation", list(INTERPOLATIONS))
def test_resizing_only_the_crop_matches_resizing_all_then_cropping(interpolation: str) -> None:
    rng = np.random.default_rng(7)
    for image_size, crop_pct in [(224, 0.9), (224, 0.875), (32, 1.0), (28, 1.0)]:
        config = PreprocessConfig(image_size=image_size, crop_pct=crop_pct, interpolation=interpolation)
        for size in [(640, 427), (451, 300), (24, 24), (1000, 37), (300, 301), (3000, 2000)]:
            noise = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            got, want = preprocess(noise, config).astype(int), _resize_all_then_crop(noise, config).astype(int)
            if interpolation in ("nearest", "box"):  # these resize all, then crop: identical
                assert np.array_equal(got, want), (config, size)
            else:  # noise is the worst case for rounding
                assert np.abs(got - want).max() <= 1, (config, size)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "1"])
def test_every_colour_mode_becomes_rgb(mode: str) -> None:
    image = Image.new(mode, (40, 30))
    out = preprocess(image, PreprocessConfig(image_size=16))
    assert out.shape == (16, 16, 3)


def test_transparent_pixels_become_white_and_16_bit_is_scaled() -> None:
    assert (preprocess(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), PreprocessConfig(image_size=8)) == 255).all()
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert (preprocess(deep, PreprocessConfig(image_size=8)) == 255).all()


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image.info["exif"] = exif.tobytes()
    image = Image.open(_roundtrip_jpeg(image, exif))
    out = preprocess(image, PreprocessConfig(image_size=10, interpolation="nearest"))
    assert out[0, 5].mean() > 200 and out[-1, 5].mean() < 50  # the white half is now on top


def _roundtrip_jpeg(image: Image.Image, exif: Image.Exif):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    buffer.seek(0)
    return buffer


def test_normalize_matches_mean_std() -> None:
    config = PreprocessConfig(image_size=2, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    batch = stack([np.full((2, 2, 3), 255, dtype=np.uint8), np.zeros((2, 2, 3), dtype=np.uint8)])
    x = normalize(batch, config)
    assert x.shape == (2, 3, 2, 2) and x.dtype == np.float32
    assert np.allclose(x[0, :, 0, 0], [1.0, 3.0, 1.0]) and np.allclose(x[1, :, 0, 0], [-1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="expects uint8"):
        normalize(x, config)


def test_config_validation_and_json() -> None:
    config = PreprocessConfig(image_size=224, crop_pct=0.9)
    assert config.resize_size == 248
    assert PreprocessConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="crop_pct must be in"):
        PreprocessConfig(crop_pct=1.5)
    with pytest.raises(ValueError, match="interpolation 'cubic' unknown"):
        PreprocessConfig(interpolation="cubic")
    with pytest.raises(ValueError, match="unknown key"):
        PreprocessConfig.from_dict({"size": 3})


def test_preprocessing_and_the_server_import_no_torch() -> None:
    code = "import sys, stageformer.core.preprocess, service; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _jpeg(size: tuple[int, int], fmt: str = "JPEG") -> Image.Image:
    import io

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.float64)
    pixels += rng.normal(0, 8, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format=fmt, quality=90)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_large_jpegs_decode_at_a_reduced_scale_that_keeps_twice_the_resize_target() -> None:
    config = PreprocessConfig(image_size=32, crop_pct=1.0)
    image = reduce_while_decoding(_jpeg((1600, 1200)), config, oversample=2.0)
    image.load()
    assert image.size == (200, 150)  # 1/8: the short side 150 is still >= 2 x 32
    exact = preprocess(_jpeg((1600, 1200)), config)
    fast = preprocess(image, config)
    mse = np.mean((exact.astype(np.float64) - fast.astype(np.float64)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30  # close to the exact path, not equal
    wider = reduce_while_decoding(_jpeg((1600, 1200)), config, oversample=8.0)
    assert wider.size == (400, 300)  # 1/4 keeps the short side >= 8 x 32 = 256; 1/8 would not


def test_what_cannot_or_need_not_be_reduced_is_left_alone() -> None:
    config = PreprocessConfig(image_size=224, crop_pct=0.875)
    assert reduce_while_decoding(_jpeg((640, 480)), config).size == (640, 480)  # 480 < 2 x 2 x 256
    small = PreprocessConfig(image_size=32)
    assert reduce_while_decoding(_jpeg((1600, 1200), "PNG"), small).size == (1600, 1200)  # not a JPEG
