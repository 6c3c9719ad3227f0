"""Calibration folders: which files count, how they are read (the server's preprocessing), the held-out split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.calibration import held_out_mask, image_files, read_calibration_images, thin
from export.errors import ExportError
from export.parity import scene
from stageformer.core.preprocess import PreprocessConfig, preprocess

CONFIG = PreprocessConfig(16, crop_pct=0.875, interpolation="bilinear")


def photo(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A real-looking RGB picture of ``size`` (width, height)."""
    pixels = scene(np.random.default_rng(seed), max(size))
    return Image.fromarray(pixels[: size[1], : size[0]])


def test_image_files_are_sorted_filtered_and_recursive(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ("b/2.JPG", "a.png", "b/1.webp", "c.tiff", ".hidden.png", ".cache/x.png"):
        photo(0).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "d.png").mkdir()  # a folder named like an image
    found = [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)]
    assert found == ["a.png", "b/1.webp", "b/2.JPG", "c.tiff"]


def test_pixels_are_the_servers_preprocessing_of_each_file(tmp_path: Path) -> None:
    """Every mode a client may send (grayscale, palette, alpha, 16-bit) and any size, through the one
    ``preprocess`` function, the first frame of an animation as the server reads it."""
    images = {
        "rgb.jpg": photo(1, (64, 48)),
        "gray.png": photo(2, (30, 50)).convert("L"),
        "palette.gif": photo(3, (20, 20)).convert("P"),
        "alpha.png": photo(4, (33, 17)).convert("RGBA"),
        "wide.bmp": photo(5, (200, 16)),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    result = read_calibration_images(tmp_path, CONFIG)
    assert result.names == tuple(sorted(images))
    assert result.pixels.dtype == np.uint8 and result.pixels.shape == (5, 16, 16, 3)
    for name, pixels in zip(result.names, result.pixels, strict=True):
        with Image.open(tmp_path / name) as opened:
            np.testing.assert_array_equal(pixels, preprocess(opened, CONFIG))


def test_every_fifth_image_is_held_out() -> None:
    assert held_out_mask(12).tolist() == [False] * 4 + [True] + [False] * 4 + [True] + [False] * 2
    assert held_out_mask(3).tolist() == [False, False, True]  # too few for every fifth: the last one
    assert held_out_mask(2).tolist() == [False, True]


def test_calibration_and_held_out_pixels_do_not_overlap(tmp_path: Path) -> None:
    for i in range(7):
        photo(i).save(tmp_path / f"{i}.png")
    result = read_calibration_images(tmp_path, CONFIG)
    assert len(result.calibration) == 6 and len(result.held_out_pixels) == 1
    np.testing.assert_array_equal(result.held_out_pixels[0], result.pixels[4])


def test_large_folders_are_thinned_evenly(tmp_path: Path) -> None:
    files = [tmp_path / f"{i:02d}.png" for i in range(10)]
    assert thin(files, 20) == files
    assert [f.name for f in thin(files, 4)] == ["00.png", "03.png", "06.png", "09.png"]
    for i in range(6):
        photo(i).save(tmp_path / f"{i}.png")
    assert read_calibration_images(tmp_path, CONFIG, max_images=3).names == ("0.png", "2.png", "5.png")


def test_broken_files_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        photo(i).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    with caplog.at_level(logging.WARNING, logger="export.calibration"):
        result = read_calibration_images(tmp_path, CONFIG)
    assert result.names == ("0.png", "1.png", "2.png") and result.skipped == ("broken.jpg",)
    assert "skipped broken.jpg" in caplog.text


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([], r"holds 0 readable images; int8 quantization needs at least 2"),
        (["notes.txt"], r"holds 0 readable images"),
        (["one.png"], r"holds 1 readable image; .* at least 2 \(one is held out"),
        (["one.png", "broken.png"], r"holds 1 readable image \(1 image files could not be read\)"),
    ],
)
def test_too_few_images_is_a_clear_error(tmp_path: Path, files: list[str], message: str) -> None:
    for name in files:
        if name == "one.png":
            photo(0).save(tmp_path / name)
        else:
            (tmp_path / name).write_text("no pixels here")
    with pytest.raises(ExportError, match=message):
        read_calibration_images(tmp_path, CONFIG)


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist or is not a folder"):
        read_calibration_images(tmp_path / "nope", CONFIG)
