"""Calibration images for int8 quantization: a folder of pictures, read the way the server reads uploads.

Torch-free. Every file under the folder (sub-folders included, hidden files and folders skipped) whose
extension names a format Pillow can open is decoded (its first frame, as the server does) and turned
into model input by ``stageformer.core.preprocess.preprocess``, the function the server runs on every
request, so calibration sees exactly the pixels a served model sees. Files come in path order; every
``HOLD_OUT_EVERY``-th one is held out: it is not used to compute the quantization ranges, only to check
the quantized graph. A folder with more than ``MAX_CALIBRATION_IMAGES`` image files is thinned evenly
(every k-th file), which keeps the mix of sub-folders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stageformer.core.preprocess import PreprocessConfig, preprocess

from .errors import ExportError
from .options import HOLD_OUT_EVERY, MAX_CALIBRATION_IMAGES, RECOMMENDED_CALIBRATION_IMAGES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationImages:
    """The decoded, preprocessed images of a calibration folder and which of them are held out."""

    folder: Path
    names: tuple[str, ...]  # paths relative to ``folder``, in the order of ``pixels``
    pixels: np.ndarray  # uint8 [N, H, W, 3]
    held_out: np.ndarray  # bool [N]: True for the images kept out of calibration
    skipped: tuple[str, ...] = ()  # image files that could not be read

    @property
    def calibration(self) -> np.ndarray:
        """The pixels the quantization ranges are computed from."""
        return self.pixels[~self.held_out]

    @property
    def held_out_pixels(self) -> np.ndarray:
        return self.pixels[self.held_out]


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the formats the installed Pillow can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def image_files(folder: Path) -> list[Path]:
    """Files under ``folder`` with an image extension, sorted by relative path; hidden ones left out."""
    extensions = image_extensions()
    files = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in extensions
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def thin(files: list[Path], limit: int) -> list[Path]:
    """At most ``limit`` of ``files``, evenly spaced over the list."""
    if len(files) <= limit:
        return files
    keep = np.unique(np.linspace(0, len(files) - 1, limit).round().astype(np.int64))
    return [files[i] for i in keep]


def read_image(path: Path, config: PreprocessConfig) -> np.ndarray:
    """One file -> ``uint8 [H, W, 3]`` model input: open, decode the first frame, ``preprocess``."""
    with Image.open(path) as image:
        image.load()
        return preprocess(image, config)


def held_out_mask(count: int) -> np.ndarray:
    """Every ``HOLD_OUT_EVERY``-th image (the last one when there are fewer) is held out."""
    mask = np.arange(count) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    if not mask.any() and count:
        mask[-1] = True
    return mask


def read_calibration_images(
    folder: str | Path, config: PreprocessConfig, max_images: int = MAX_CALIBRATION_IMAGES
) -> CalibrationImages:
    """Read ``folder``'s images for calibration; raises ``ExportError`` when fewer than two can be read.

    A file that has an image extension but cannot be decoded is skipped with a warning (and counted in
    ``skipped``), as one broken file in a large folder should not stop an export."""
    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"calibration folder {str(root)!r} does not exist or is not a folder")
    files = thin(image_files(root), max_images)
    names: list[str] = []
    pixels: list[np.ndarray] = []
    skipped: list[str] = []
    for path in files:
        name = path.relative_to(root).as_posix()
        try:
            pixels.append(read_image(path, config))
        except Exception as exc:  # Pillow raises many types on broken files
            logger.warning("calibration: skipped %s, which cannot be read as an image: %s", name, exc)
            skipped.append(name)
            continue
        names.append(name)
    if len(pixels) < 2:
        found = f"{len(pixels)} readable image{'s' if len(pixels) != 1 else ''}"
        broken = f" ({len(skipped)} image files could not be read)" if skipped else ""
        raise ExportError(
            f"calibration folder {str(root)!r} holds {found}{broken}; int8 quantization needs at least 2 "
            "(one is held out to check the result), and a few hundred representative images (JPEG, PNG, WebP, "
            "... any format Pillow opens) work best"
        )
    if len(pixels) < RECOMMENDED_CALIBRATION_IMAGES:
        logger.warning(
            "calibration: only %d images in %s; ranges computed from few images may clip what other inputs "
            "produce: a few hundred representative images work best",
            len(pixels),
            root,
        )
    return CalibrationImages(root, tuple(names), np.stack(pixels), held_out_mask(len(pixels)), tuple(skipped))
