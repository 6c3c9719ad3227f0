"""What the demo model is judged on: held-out digits from four sources, none of them used in training.

- ``sklearn``: the 20% of scikit-learn's digits that training holds out (``model.data.digits_split``),
  dark on light at the model's input size, as the validation split has them.
- ``typed``: every digit in every font of ``model.digits.HELD_OUT_FONTS`` (families training never
  renders), typed in a square picture of 28 to 200 pixels at various sizes and small offsets, dark on
  light, a third of them light on dark.
- ``typed-small``: the same, the digit small in the picture (a fifth to a third of its height).
- ``drawn``: digits drawn on a canvas with a mouse or finger: round-capped lines of one width, in the
  shapes of ``HELD_OUT_HAND`` (written separately from training's ``model.digits.HAND``), dark on
  light, a fifth of them light on dark.
- ``photo``: the same held-out shapes written with a pen on paper and photographed: tilted, uneven
  light, a shadow, grain, defocus, noise and JPEG.

Each picture reaches the model as it would through ``stageformer serve``: a JPEG decoded as the server
decodes it by default (at a reduced scale when large, ``reduce_while_decoding``), then the server's
``preprocess``. Nothing is random except through seeded generators, so the figures are the same on every run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from stageformer.core.preprocess import PreprocessConfig, preprocess, reduce_while_decoding, stack

from .digits import HELD_OUT_FONTS, Hand, Pen, Shape, arc, draw_digit, font_files, polyline, stroke, trace

SOURCES = ("sklearn", "typed", "typed-small", "drawn", "photo")
SEED = 20_240_601  # of every held-out set; the training recipe never uses it
SERVER_OVERSAMPLE = 2.0  # stageformer serve's default decoding: --decode fast, --decode-oversample 2

# A second hand, for testing only: each digit in two or three shapes, unit square, y downwards.
HELD_OUT_HAND: Hand = {
    0: (
        (stroke(arc(0.5, 0.5, 0.22, 0.45, -125, 245)),),
        (stroke(arc(0.5, 0.52, 0.31, 0.4, -80, -445)),),
    ),
    1: (
        (stroke(((0.26, 0.34), (0.42, 0.2), (0.56, 0.04)), ((0.56, 0.96),)),),
        (polyline((0.4, 0.18), (0.53, 0.04), (0.53, 0.96)), polyline((0.34, 0.96), (0.7, 0.96))),
        (polyline((0.56, 0.04), (0.46, 0.96)),),
    ),
    2: (
        (stroke(arc(0.48, 0.3, 0.28, 0.25, 185, 375), ((0.5, 0.62), (0.22, 0.94)), ((0.5, 0.88), (0.86, 0.92))),),
        (stroke(((0.2, 0.22), (0.45, 0.06), (0.74, 0.18), (0.66, 0.46)), ((0.18, 0.94),), ((0.84, 0.94),)),),
    ),
    3: (
        (stroke(arc(0.47, 0.26, 0.26, 0.2, 195, 445), ((0.38, 0.48),), arc(0.48, 0.72, 0.3, 0.23, 265, 525)[1:]),),
        (stroke(arc(0.5, 0.22, 0.2, 0.17, 200, 455), arc(0.47, 0.64, 0.32, 0.3, 270, 500)[1:]),),
    ),
    4: (
        (polyline((0.7, 0.96), (0.7, 0.04), (0.14, 0.7), (0.9, 0.7)),),
        (stroke(((0.36, 0.04), (0.26, 0.42), (0.22, 0.6)), ((0.86, 0.58),)), polyline((0.64, 0.26), (0.61, 0.96))),
    ),
    5: (
        (stroke(((0.76, 0.05), (0.42, 0.07)), ((0.36, 0.42),), ((0.56, 0.36), (0.76, 0.56), (0.7, 0.82), (0.44, 0.94),
                                                                  (0.22, 0.84))),),
        (stroke(((0.34, 0.06),), ((0.3, 0.38),), arc(0.5, 0.63, 0.3, 0.3, 228, 505)[1:]),
         polyline((0.34, 0.06), (0.82, 0.07))),
    ),
    6: (
        (stroke(((0.6, 0.04), (0.36, 0.34), (0.24, 0.66)), arc(0.5, 0.68, 0.26, 0.27, 180, -180)[1:]),),
        (stroke(((0.72, 0.1), (0.5, 0.05), (0.3, 0.25), (0.24, 0.6)), arc(0.48, 0.7, 0.24, 0.23, 200, -150)[1:]),),
    ),
    7: (
        (stroke(((0.18, 0.14), (0.5, 0.08), (0.84, 0.1)), ((0.36, 0.96),)),),
        (polyline((0.2, 0.08), (0.82, 0.08)), stroke(((0.82, 0.08), (0.6, 0.45), (0.48, 0.96))),
         polyline((0.4, 0.5), (0.74, 0.48))),
    ),
    8: (
        (stroke(((0.5, 0.06), (0.3, 0.18), (0.4, 0.38), (0.64, 0.56), (0.7, 0.8), (0.5, 0.95), (0.28, 0.8),
                 (0.36, 0.56), (0.6, 0.38), (0.7, 0.18), (0.5, 0.06))),),
        (stroke(arc(0.52, 0.27, 0.2, 0.19, 90, 450)), stroke(arc(0.48, 0.7, 0.26, 0.24, 270, -90))),
    ),
    9: (
        (stroke(arc(0.46, 0.28, 0.24, 0.2, -10, -370), ((0.72, 0.6), (0.64, 0.96))),),
        (stroke(arc(0.46, 0.3, 0.22, 0.22, -90, -450)), stroke(((0.68, 0.3), (0.7, 0.62), (0.62, 0.96)))),
        (stroke(arc(0.48, 0.27, 0.23, 0.21, 5, -355), ((0.7, 0.7), (0.5, 0.94), (0.3, 0.88))),),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One held-out picture: its source, its digit, whether it is light ink on a dark ground, and for a
    JPEG the file's bytes (which the server may decode at a reduced scale)."""

    source: str
    label: int
    image: Image.Image
    inverted: bool = False
    jpeg: bytes | None = None

    def pixels(self, config: PreprocessConfig, oversample: float | None = SERVER_OVERSAMPLE) -> np.ndarray:
        """What the model is given of this picture by the server: ``uint8 [S, S, 3]``. ``oversample=None``
        is the server's exact decoding (``--decode exact``)."""
        if self.jpeg is None or oversample is None:
            return preprocess(self.image, config)
        image = reduce_while_decoding(Image.open(io.BytesIO(self.jpeg)), config, oversample)
        image.load()
        return preprocess(image, config)


# --- typed ---------------------------------------------------------------------------------------


TYPED_SIZE = (0.55, 0.9)  # font size (em) of typed digits, of the picture's side (the digit: 40-65% of it)
SMALL_SIZE = (0.28, 0.45)  # font size of the small typed digits (the digit: 20-32% of the picture)


def typed_case(
    font: Path, digit: int, rng: np.random.Generator, inverted: bool, size: tuple[float, float] = TYPED_SIZE
) -> Image.Image:
    """``digit`` typed in ``font`` as a person would screenshot it: a square of 28 to 200 pixels, the
    font size a fraction ``size`` of it (a digit is about 0.7 em high), moved by up to 8% of it, dark on
    light (or light on dark)."""
    side = round(math.exp(rng.uniform(math.log(28), math.log(200))))
    paper, ink = int(rng.integers(215, 256)), int(rng.integers(0, 61))
    if inverted:
        paper, ink = 255 - paper, 255 - ink
    image = Image.new("RGB", (side, side), (paper,) * 3)
    font_px = max(8, round(side * rng.uniform(*size)))
    face = ImageFont.truetype(str(font), font_px, layout_engine=ImageFont.Layout.BASIC)
    x, y = side / 2 + rng.uniform(-0.08, 0.08) * side, side / 2 + rng.uniform(-0.08, 0.08) * side
    ImageDraw.Draw(image).text((x, y), str(digit), fill=(ink,) * 3, font=face, anchor="mm")
    return image


def typed_cases(
    fonts: Sequence[Path] | None = None,
    seed: int = SEED,
    size: tuple[float, float] = TYPED_SIZE,
    source: str = "typed",
) -> list[Case]:
    """Every digit in every held-out font (``HELD_OUT_FONTS`` unless ``fonts`` is given), a third inverted."""
    rng = np.random.default_rng((seed, 1))
    cases = []
    for font in font_files(HELD_OUT_FONTS) if fonts is None else fonts:
        for digit in range(10):
            inverted = bool(rng.random() < 1 / 3)
            cases.append(Case(source, digit, typed_case(font, digit, rng, inverted, size), inverted))
    return cases


# --- drawn on a canvas -------------------------------------------------------------------------------


def canvas_drawing(shape: Shape, rng: np.random.Generator, inverted: bool) -> Image.Image:
    """``shape`` drawn on a canvas of 200 to 400 pixels as a mouse or finger draws it: lines of one
    width (2% to 7% of the canvas) with round ends, the digit 45% to 85% of the canvas high,
    leaning a little, off centre by up to a tenth of the canvas."""
    side = int(rng.integers(200, 401))
    lean = rng.uniform(-0.2, 0.2)
    paths = [trace(part) @ np.array([[1.0, 0.0], [lean, 1.0]]) for part in shape]
    points = np.vstack(paths)
    low, high = points.min(axis=0), points.max(axis=0)
    scale = rng.uniform(0.45, 0.85) * side / max(high[1] - low[1], 1e-6)
    centre = np.array([side / 2, side / 2]) + rng.uniform(-0.1, 0.1, size=2) * side
    width = max(2, round(rng.uniform(0.02, 0.07) * side))
    paper, ink = (0, 0, 0) if inverted else (255, 255, 255), (255, 255, 255) if inverted else (0, 0, 0)
    image = Image.new("RGB", (side, side), paper)
    draw = ImageDraw.Draw(image)
    for path in paths:
        xy = [(float(x), float(y)) for x, y in (path - (low + high) / 2) * scale + centre]
        draw.line(xy, fill=ink, width=width, joint="curve")
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=ink)
    return image


def drawn_cases(per_shape: int = 12, seed: int = SEED) -> list[Case]:
    """Every held-out shape drawn ``per_shape`` times on a canvas, a fifth of them light on dark."""
    rng = np.random.default_rng((seed, 2))
    cases = []
    for digit, shapes in HELD_OUT_HAND.items():
        for shape in shapes:
            for _ in range(per_shape):
                inverted = bool(rng.random() < 0.2)
                cases.append(Case("drawn", digit, canvas_drawing(shape, rng, inverted), inverted))
    return cases


# --- photographed on paper -------------------------------------------------------------------------


def photograph(ink: Image.Image, rng: np.random.Generator) -> bytes:
    """A black-on-white digit written on paper and photographed with a phone: a picture of 100 to 260
    pixels, the digit 40% to 80% of it high, tilted by up to 10 degrees; off-white paper, ballpoint
    or pencil, light falling off towards one corner, a shadow's soft edge across part of the page,
    paper grain, a slightly soft focus, sensor noise; the JPEG file (quality 60 to 90)."""
    side = int(rng.integers(100, 261))
    glyph = ink.crop(Image.eval(ink, lambda v: 255 - v).getbbox() or (0, 0, *ink.size))
    height = rng.uniform(0.4, 0.8) * side
    glyph = glyph.resize((max(1, round(glyph.width * height / glyph.height)), round(height)), Image.Resampling.LANCZOS)
    page = Image.new("L", (side, side), 255)
    page.paste(glyph, ((side - glyph.width) // 2 + int(rng.integers(-side // 12, side // 12 + 1)),
                       (side - glyph.height) // 2 + int(rng.integers(-side // 12, side // 12 + 1))))  # fmt: skip
    page = page.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BICUBIC, fillcolor=255)
    coverage = 1.0 - np.asarray(page, dtype=np.float32) / 255.0
    paper = np.array([rng.uniform(205, 245), rng.uniform(200, 240), rng.uniform(185, 230)], dtype=np.float32)
    pens = (np.array([30.0, 40.0, 120.0]), np.array([25.0, 25.0, 30.0]), np.array([95.0, 95.0, 100.0]))
    pen = (pens[int(rng.integers(len(pens)))] + rng.uniform(-15, 15, size=3)).astype(np.float32)
    picture = paper * (1 - coverage[..., None]) + pen * coverage[..., None]
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    corner = rng.integers(0, 2, size=2)
    falloff = 1.0 - rng.uniform(0.1, 0.35) * np.hypot(x - corner[0], y - corner[1]) / math.sqrt(2)
    edge = rng.uniform(0.2, 0.8)
    shadow = 1.0 - rng.uniform(0.1, 0.3) / (1.0 + np.exp(-(x + 0.5 * y - edge - 0.25) / 0.04))
    grain = np.asarray(Image.fromarray(rng.normal(0, 4, size=(side // 4, side // 4)).astype(np.float32), mode="F")
                       .resize((side, side), Image.Resampling.BILINEAR))  # fmt: skip
    noise = rng.normal(0, 3, size=picture.shape).astype(np.float32)
    picture = picture * (falloff * shadow)[..., None] + grain[..., None] + noise
    image = Image.fromarray(np.clip(np.rint(picture), 0, 255).astype(np.uint8), mode="RGB")
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * side / 150))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(60, 91)))
    return buffer.getvalue()


PHOTO_PEN = Pen(slant=0.25, rotate=5.0, wobble=(0.0, 0.03), width=(0.05, 0.11))


def photo_cases(per_shape: int = 12, seed: int = SEED) -> list[Case]:
    """Every held-out shape written ``per_shape`` times and photographed."""
    rng = np.random.default_rng((seed, 3))
    cases = []
    for digit, shapes in HELD_OUT_HAND.items():
        for shape in shapes:
            for _ in range(per_shape):
                ink = draw_digit(digit, rng, {digit: (shape,)}, PHOTO_PEN, size=160)
                jpeg = photograph(ink, rng)
                cases.append(Case("photo", digit, Image.open(io.BytesIO(jpeg)).convert("RGB"), jpeg=jpeg))
    return cases


# --- scikit-learn and all together --------------------------------------------------------------------


def sklearn_cases(size: int) -> list[Case]:
    """scikit-learn's held-out digits, dark on light at ``size`` square, as training validates on them."""
    from .data import DigitsSource, digits_split, sklearn_digits

    images, labels = sklearn_digits()
    _, held_out = digits_split(labels)
    source = DigitsSource(images[held_out], labels[held_out], size)
    return [Case("sklearn", source.label(i), source.image(i)) for i in range(len(source))]


def held_out_cases(config: PreprocessConfig) -> list[Case]:
    """All held-out sets, in ``SOURCES`` order."""
    small = typed_cases(seed=SEED + 1, size=SMALL_SIZE, source="typed-small")
    return sklearn_cases(config.image_size) + typed_cases() + small + drawn_cases() + photo_cases()


Predict = Callable[[np.ndarray], np.ndarray]  # uint8 [B, H, W, 3] -> predicted class indices [B]


def predictions(
    predict: Predict,
    cases: Sequence[Case],
    config: PreprocessConfig,
    oversample: float | None = SERVER_OVERSAMPLE,
    batch: int = 256,
) -> np.ndarray:
    """What ``predict`` says of each case, each picture decoded and preprocessed as the server does
    (``Case.pixels``)."""
    out = []
    for start in range(0, len(cases), batch):
        pixels = stack([c.pixels(config, oversample) for c in cases[start : start + batch]])
        out.append(np.asarray(predict(pixels)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def accuracy_by_source(cases: Sequence[Case], predicted: np.ndarray) -> dict[str, float]:
    """Fraction right per source, plus ``<source>/inverted`` and ``<source>/upright`` where a source has both."""
    right = np.array([c.label for c in cases]) == predicted
    both = {c.source for c in cases if c.inverted} & {c.source for c in cases if not c.inverted}
    groups: dict[str, list[bool]] = {}
    for case, ok in zip(cases, right, strict=True):
        groups.setdefault(case.source, []).append(bool(ok))
        if case.source in both:
            polarity = "inverted" if case.inverted else "upright"
            groups.setdefault(f"{case.source}/{polarity}", []).append(bool(ok))
    return {name: float(np.mean(values)) for name, values in groups.items()}
