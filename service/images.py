"""Decoding uploaded images safely: size checked before pixels are decoded, formats limited, errors
that say what is wrong. Runs in the decode worker pool, never on the event loop.

What is refused, and how (``ServiceError`` kinds):
- empty bytes: bad input; bytes that are no image of a supported format: unsupported media; bytes
  that start like a supported format but cannot be read (corrupt header, truncated or broken data): bad input;
- more than ``max_pixels`` pixels, read from the header before any pixel is decoded: too large;
- a strip so elongated that resizing its short side to the model's size would make more than
  ``max_pixels`` pixels (e.g. 1,000,000 x 1 for a 224-pixel model): too large.
Animations give their first frame; every colour mode (grayscale, palette, CMYK, 16-bit, alpha) becomes RGB.
JPEG data damaged in its scan is decoded as far as the decoder can, as browsers show it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from stageformer.core.preprocess import PreprocessConfig, preprocess, reduce_while_decoding, resized_size

from .errors import Kind, ServiceError, bad_input, too_large

Image.init()  # register Pillow's format plugins now, not on the first request
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO") if f in Image.OPEN)

# leading bytes of the supported formats: such a file is an image of that format, however broken
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def sniff_format(data: bytes) -> str | None:
    """The supported format ``data`` starts like, from its leading bytes; None when none."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _unreadable(what: str, data: bytes, exc: BaseException) -> ServiceError:
    kind = sniff_format(data) or "image"
    return bad_input(f"{what} is a {kind} file that cannot be read ({exc}); it may be truncated or corrupt")


def open_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Bytes -> a Pillow image whose header is read and checked, no pixel decoded yet."""
    if not data:
        raise bad_input(f"{what} is empty; send the image file's bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise too_large(f"{what} has too many pixels ({exc}); send at most {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        kind = sniff_format(data)
        if kind is not None:
            raise bad_input(f"{what} starts like a {kind} file but its header is corrupt") from None
        raise ServiceError(
            Kind.UNSUPPORTED_MEDIA, f"{what} is not an image in a supported format; send {', '.join(FORMATS)}"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's parsers raise many types on hostile input; none is the server's fault
        raise _unreadable(what, data, exc) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise bad_input(f"{what} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise too_large(
            f"{what} is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}: resize it first"
        )
    return image


def load_image(image: Image.Image, data: bytes, what: str = "image") -> Image.Image:
    """Decode the pixels of an opened image (the frame it stands on: the first of an animation)."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable(what, data, exc) from None
    return image


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Bytes -> a decoded Pillow image (first frame of animations). The header is read first and an
    image above ``max_pixels`` is refused before any pixel is decoded."""
    return load_image(open_image(data, max_pixels, what), data, what)


def resized_pixels(width: int, height: int, config: PreprocessConfig) -> int:
    """Pixels of the image ``preprocess`` makes before its centre crop (short side -> ``resize_size``)."""
    resized_width, resized_height = resized_size(width, height, config)
    return resized_width * resized_height


def prepare(
    data: bytes, config: PreprocessConfig, max_pixels: int, what: str = "image", oversample: float | None = None
) -> np.ndarray:
    """Bytes -> model-ready ``uint8 [H, W, 3]`` pixels via the shared preprocessing function. With
    ``oversample``, a large JPEG is decoded at a reduced scale first (``reduce_while_decoding``); without, every
    pixel is decoded (the exact path, bit-identical to training's evaluation)."""
    image = open_image(data, max_pixels, what)
    width, height = image.size
    resized = resized_pixels(width, height, config)
    if resized > max(max_pixels, config.resize_size**2):
        ratio = max(1, max_pixels // config.resize_size**2)
        raise too_large(
            f"{what} is {width}x{height}, too elongated: resizing its short side to {config.resize_size} pixels would "
            f"make {resized:,} pixels (limit {max_pixels:,}); crop it to a side ratio of at most {ratio}:1 first",
        )
    if oversample is not None:
        image = reduce_while_decoding(image, config, oversample)
    image = load_image(image, data, what)
    try:
        return preprocess(image, config)
    except MemoryError:
        raise
    except Exception as exc:
        raise bad_input(f"{what} cannot be converted to RGB ({exc})") from None
