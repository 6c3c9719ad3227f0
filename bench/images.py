"""The images the benchmark sends: real photographs as JPEG files.

The photos come from inside the scikit-image wheel (its ``data`` folder: astronaut, coffee, chelsea,
rocket, ...), read as files with Pillow, so nothing is downloaded. Each is scaled to a typical upload
size (longest side 640 pixels) and saved as a JPEG of quality 90. Without scikit-image the set is
made of synthetic pictures instead (smooth gradients with shapes and noise, also saved as JPEG), and
the report says so.

``load_mosaics`` makes camera-sized JPEGs (12 megapixels, what a phone uploads) for the decoding figures:
tiles cut from the same photos at their full resolution, so the detail is a photograph's, not an upscale's.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
LONG_SIDE = 640
QUALITY = 90
MOSAIC_SIZE = (4032, 3024)  # a 12-megapixel phone camera's frame
MOSAIC_TILE = 336  # tiles of this side, cut from the photos at full resolution


@dataclass(frozen=True)
class ImageSet:
    """JPEG files' bytes, their names, and where they came from."""

    names: tuple[str, ...]
    jpegs: tuple[bytes, ...]
    source: str  # "scikit-image photos" or "synthetic"

    @property
    def mean_bytes(self) -> float:
        return sum(map(len, self.jpegs)) / len(self.jpegs)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [Image.open(io.BytesIO(j)).size for j in self.jpegs]


def _skimage_data() -> Path | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if folder.is_dir() else None


def _to_jpeg(image: Image.Image, long_side: int | None = LONG_SIDE) -> bytes:
    image = image.convert("RGB")
    scale = long_side / max(image.size) if long_side else 1.0
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def synthetic_image(seed: int, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A deterministic picture with gradients, shapes and noise (compresses like a photo, roughly)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(x / w) * 255, (y / h) * 255, ((x + y) / (w + h)) * 255], axis=-1)
    base = base * rng.uniform(0.4, 1.0, 3) + rng.normal(0, 12, (h, w, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def load_images(count: int = 8, synthetic: bool = False) -> ImageSet:
    """``count`` JPEGs: scikit-image's photos (cycled when more are asked for, each repeat mirrored so
    its bytes differ), or synthetic pictures when scikit-image is absent or ``synthetic`` is set."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    folder = None if synthetic else _skimage_data()
    photos = [folder / name for name in PHOTOS if folder is not None and (folder / name).is_file()]
    if not photos:
        jpegs = tuple(_to_jpeg(synthetic_image(i)) for i in range(count))
        return ImageSet(tuple(f"synthetic-{i}.jpg" for i in range(count)), jpegs, "synthetic")
    names: list[str] = []
    files: list[bytes] = []
    for i in range(count):
        path = photos[i % len(photos)]
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        if (i // len(photos)) % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        names.append(f"{path.stem}-{i}.jpg")
        files.append(_to_jpeg(image))
    return ImageSet(tuple(names), tuple(files), "scikit-image photos")


def _photo_images() -> list[Image.Image]:
    folder = _skimage_data()
    images = []
    for name in PHOTOS:
        path = folder / name if folder is not None else None
        if path is not None and path.is_file():
            with Image.open(path) as opened:
                images.append(opened.convert("RGB"))
    return images


def mosaic(photos: list[Image.Image], seed: int, size: tuple[int, int] = MOSAIC_SIZE) -> Image.Image:
    """A picture of ``size`` tiled with ``MOSAIC_TILE``-pixel squares cut at random places from ``photos`` at their
    full resolution (photos smaller than a tile are left out), some mirrored."""
    usable = [p for p in photos if min(p.size) >= MOSAIC_TILE]
    if not usable:
        raise ValueError(f"no photo is at least {MOSAIC_TILE} pixels on its short side")
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", size)
    for top in range(0, size[1], MOSAIC_TILE):
        for left in range(0, size[0], MOSAIC_TILE):
            photo = usable[int(rng.integers(len(usable)))]
            x = int(rng.integers(0, photo.width - MOSAIC_TILE + 1))
            y = int(rng.integers(0, photo.height - MOSAIC_TILE + 1))
            tile = photo.crop((x, y, x + MOSAIC_TILE, y + MOSAIC_TILE))
            if rng.random() < 0.5:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas.paste(tile, (left, top))
    return canvas


def load_mosaics(count: int = 2, synthetic: bool = False, size: tuple[int, int] = MOSAIC_SIZE) -> ImageSet:
    """``count`` camera-sized JPEGs (``size``, quality 90): mosaics of the photos at full resolution, or synthetic
    pictures of that size when scikit-image is absent or ``synthetic`` is set."""
    photos = [] if synthetic else _photo_images()
    if photos:
        pictures = [mosaic(photos, seed, size) for seed in range(count)]
        source = f"mosaics of scikit-image photos at full resolution, {size[0]}x{size[1]}"
    else:
        pictures = [synthetic_image(seed, size) for seed in range(count)]
        source = f"synthetic, {size[0]}x{size[1]}"
    jpegs = tuple(_to_jpeg(p, long_side=None) for p in pictures)
    return ImageSet(tuple(f"mosaic-{i}.jpg" for i in range(count)), jpegs, source)
