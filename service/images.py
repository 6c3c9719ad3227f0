"""Decoding uploaded images safely: size checked before pixels are decoded, formats limited, errors
that say what is wrong. Runs in the decode worker pool, never on the event loop."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .preprocess import PreprocessConfig, preprocess

Image.init()  # register Pillow's format plugins now, not on the first request
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO") if f in Image.OPEN)


class ImageError(ValueError):
    """An uploaded image cannot be used; ``status`` is the HTTP status that fits."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Bytes -> a decoded Pillow image (first frame of animations). The header is read first and an
    image above ``max_pixels`` is refused before any pixel is decoded."""
    if not data:
        raise ImageError(400, f"{what} is empty; send the image file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(413, f"{what} has too many pixels ({exc}); send at most {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(415, f"{what} is not an image in a supported format; send {', '.join(FORMATS)}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(400, f"{what} cannot be read ({exc}); it may be corrupt") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(400, f"{what} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            413, f"{what} is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}: resize it first"
        )
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(400, f"{what} is truncated or corrupt ({exc}); send the whole file") from None
    return image


def prepare(data: bytes, config: PreprocessConfig, max_pixels: int, what: str = "image") -> np.ndarray:
    """Bytes -> model-ready ``uint8 [H, W, 3]`` pixels via the shared preprocessing function."""
    image = decode_image(data, max_pixels, what)
    try:
        return preprocess(image, config)
    except (OSError, ValueError) as exc:
        raise ImageError(400, f"{what} cannot be converted to RGB ({exc})") from None
