"""Training data: image-folder trees and the built-in ``digits`` set, as uint8 images and labels.

Every sample leaves its data set as ``uint8 [H, W, 3]`` RGB pixels. Evaluation samples go through
``stageformer.core.preprocess.preprocess``, the very function the server runs; training samples go through a
random augmentation instead. Both are turned into model input by ``stageformer.core.preprocess.normalize`` in
``Collate``, so the value range and normalization seen in training are the served ones.

Augmentation randomness comes from ``(seed, epoch, index)`` alone, not from worker processes or
global state: an epoch sees the same images whatever the number of workers, and a resumed run
repeats what an uninterrupted one would have done.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stageformer.core.preprocess import INTERPOLATIONS, PreprocessConfig, normalize, preprocess, stack, to_rgb

from .digits import TRAIN_FONTS, Concat, DrawnDigits, MissingFontsError, Source, TypedDigits, font_files
from .digits import DigitAugment as DigitAugment  # the digits' augmentation, where it used to be

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
DIGITS = "digits"  # the name of the built-in data set on the command line
DIGITS_HELD_OUT = 0.2  # fraction of each digit class kept for validation
DIGITS_SPLIT_SEED = 0  # the held-out split never changes
DIGITS_DRAWN = 4000  # digits drawn by model.digits.draw_digit in the training split
DIGITS_DRAWN_SEED = 1  # their shapes and pens: the same drawings every run
DIGITS_HANDWRITTEN_REPEAT = 5  # how many times an epoch sees each scikit-learn digit (each copy augmented anew)
DIGITS_TYPED_REPEAT = 2  # how many times an epoch sees each digit of each training font


class DataError(ValueError):
    """A data set cannot be used; the message names the folder or file and says what to do."""


# --- sources: index -> decoded image -----------------------------------------------------------


class ImageSource(Protocol):
    """Decoded images and their labels, by index."""

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image: ...

    def label(self, index: int) -> int: ...


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


class FolderSource:
    """Image files on disk; a file that cannot be decoded raises a ``DataError`` naming it."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        path = self.samples[index].path
        try:
            with Image.open(path) as image:
                image.load()
                return image
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {path}: {exc}; remove or replace the file") from exc

    def label(self, index: int) -> int:
        return self.samples[index].label


def render_digit(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 scikit-learn digit (values 0..16, 16 = ink) as dark ink on white paper: RGB, ``size`` square."""
    gray = np.rint(255.0 - pixels.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


class DigitsSource:
    """scikit-learn's handwritten digits, rendered by ``render_digit`` at ``size``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int) -> None:
        self.images = images  # (N, 8, 8), values 0..16
        self.labels = labels  # (N,)
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        return render_digit(self.images[index], self.size)

    def label(self, index: int) -> int:
        return int(self.labels[index])


# --- augmentation: (image, rng) -> uint8 [S, S, 3] ----------------------------------------------


class Augment(Protocol):
    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray: ...


@dataclass(frozen=True)
class PhotoAugment:
    """Random resized crop (area ``scale``, aspect ``ratio``) and a horizontal flip, for photos."""

    config: PreprocessConfig
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        image = to_rgb(image)
        width, height = image.size
        box = (0, 0, width, height)
        for _ in range(10):  # torchvision's RandomResizedCrop: try a few areas, else the whole image
            area = width * height * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                box = (left, top, left + w, top + h)
                break
        size = self.config.image_size
        image = image.resize((size, size), INTERPOLATIONS[self.config.interpolation], box=box)
        if rng.random() < self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(image, dtype=np.uint8)


# --- the torch data set and batches ---------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset[tuple[np.ndarray, int]]):
    """``(uint8 [H, W, 3], label)`` samples: augmented when ``augment`` is given, else preprocessed
    for evaluation with the server's ``preprocess``. Indexed by ``index`` (augmented as in ``epoch``)
    or by ``(epoch, index)``, which is what ``EpochSampler`` yields, so that persistent loader
    workers, which hold their own copy of the data set, know the epoch."""

    def __init__(
        self, source: ImageSource, config: PreprocessConfig, augment: Augment | None = None, seed: int = 0
    ) -> None:
        self.source = source
        self.config = config
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[np.ndarray, int]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image = self.source.image(index)
        if self.augment is None:
            pixels = preprocess(image, self.config)
        else:
            pixels = self.augment(image, np.random.default_rng((self.seed, epoch, index)))
        return pixels, self.source.label(index)


class EpochSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Wraps an index sampler (with ``set_epoch``, e.g. ``DistributedSampler``) to yield ``(epoch, index)``."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler[Any]) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


@dataclass(frozen=True)
class Collate:
    """Samples -> ``(float32 [B, 3, H, W], int64 [B])``, normalized by the server's ``normalize``."""

    config: PreprocessConfig

    def __call__(self, batch: Sequence[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = normalize(stack([pixels for pixels, _ in batch]), self.config)
        return torch.from_numpy(images), torch.tensor([label for _, label in batch], dtype=torch.int64)


@dataclass
class DataSplits:
    """What a training run reads: train and validation sources, class names, how to augment."""

    train: ImageSource
    val: ImageSource
    labels: list[str]
    augment: Augment
    name: str  # "digits" or the folder, for logs and checkpoint metadata


def load_data(
    data: str, config: PreprocessConfig, verify_images: bool = True, show_progress: bool = False
) -> DataSplits:
    """``"digits"`` or an image-folder tree ``DATA/{train,val}/<class>/<image>``."""
    if data == DIGITS:
        return load_digits(config)
    train, val, labels = scan_image_folder(data, verify_images=verify_images, show_progress=show_progress)
    return DataSplits(FolderSource(train), FolderSource(val), labels, PhotoAugment(config), str(data))


# --- the digits data set ---------------------------------------------------------------------------


def digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the fixed train / held-out split: ``DIGITS_HELD_OUT`` of every class, chosen once."""
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    train, held_out = [], []
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        cut = round(len(members) * DIGITS_HELD_OUT)
        held_out.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits: images (N, 8, 8) with values 0..16, and labels (N,)."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise DataError(
            "the digits data set needs scikit-learn: pip install 'stageformer[train]' (or scikit-learn)"
        ) from exc
    bunch = sklearn_load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


def load_digits(config: PreprocessConfig) -> DataSplits:
    """The demo's digits. Training: scikit-learn's handwritten digits (80% of each class), every digit
    typed in the training fonts (``model.digits.TRAIN_FONTS``, Debian font packages), and
    ``DIGITS_DRAWN`` digits drawn as pen strokes, the first two repeated within an epoch; all augmented
    by ``model.digits.DigitAugment`` into pictures as people send them. Validation: the other 20% of
    scikit-learn's digits as dark ink on light paper at the model's input size, the same split every time."""
    images, labels = sklearn_digits()
    train, held_out = digits_split(labels)
    size = config.image_size
    try:
        fonts = font_files(TRAIN_FONTS)
    except MissingFontsError as exc:
        raise DataError(str(exc)) from exc
    handwritten = DigitsSource(images[train], labels[train], size)
    typed = TypedDigits(fonts)
    drawn = DrawnDigits(DIGITS_DRAWN, DIGITS_DRAWN_SEED)
    parts: list[Source] = [handwritten] * DIGITS_HANDWRITTEN_REPEAT + [typed] * DIGITS_TYPED_REPEAT + [drawn]
    log.info(
        "digits: %d handwritten x %d, %d typed (%d fonts) x %d, %d drawn",
        len(handwritten), DIGITS_HANDWRITTEN_REPEAT, len(typed), len(fonts), DIGITS_TYPED_REPEAT, len(drawn),
    )  # fmt: skip
    return DataSplits(
        Concat(parts),
        DigitsSource(images[held_out], labels[held_out], size),
        [str(i) for i in range(10)],
        DigitAugment(config),
        DIGITS,
    )


# --- image folders ---------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_folders(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(
    root: str | os.PathLike[str], verify_images: bool = True, show_progress: bool = False
) -> tuple[list[Sample], list[Sample], list[str]]:
    """Train samples, validation samples and class names (the sorted class folder names).

    Checks the layout (train/ and val/, the same classes, no empty class) and, with ``verify_images``,
    reads every file's header so that an undecodable file is reported with its path before training
    starts. Raises ``DataError`` saying what is wrong and where.
    """
    root = Path(root)
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; give an image folder ({layout}) or 'digits'")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder; {layout}")
    train_classes, val_classes = _class_folders(root / "train"), _class_folders(root / "val")
    if not train_classes:
        raise DataError(f"{root / 'train'} has no class folders; {layout}")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"train/ and val/ of {root} must have the same class folders: "
            f"only in train: {only_train or 'none'}; only in val: {only_val or 'none'}"
        )
    splits: dict[str, list[Sample]] = {}
    for split in ("train", "val"):
        samples: list[Sample] = []
        for label, name in enumerate(train_classes):
            folder = root / split / name
            files = sorted(p for p in folder.rglob("*") if _is_image(p))
            if not files:
                raise DataError(
                    f"class folder {folder} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                    "add images or remove the folder from train/ and val/"
                )
            samples.extend(Sample(p, label) for p in files)
        splits[split] = samples
    if verify_images:
        verify_image_files([s.path for s in splits["train"] + splits["val"]], show_progress)
    log.info(
        "%s: %d classes, %d train / %d val images", root, len(train_classes), len(splits["train"]), len(splits["val"])
    )
    return splits["train"], splits["val"], train_classes


def verify_image_files(paths: Sequence[Path], show_progress: bool = False) -> None:
    """Open every file's header; raise one ``DataError`` listing the files that are not readable images.

    A header that parses does not prove the rest of the file decodes (a truncated JPEG fails only when
    its pixels are read); such a file is reported with its path when training reaches it."""
    from tqdm.auto import tqdm

    bad: list[str] = []
    for path in tqdm(paths, desc="checking images", unit="img", disable=not show_progress, leave=False):
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - parsing the header is the check
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            bad.append(f"{path} ({exc})")
    if bad:
        shown = "\n  ".join(bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"{len(bad)} file(s) are not readable images; remove or replace them:\n  {shown}{more}")
