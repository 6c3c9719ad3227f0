"""Synthetic digits for the demo model: typed in the fonts of Debian font packages and drawn as pen
strokes, plus the augmentation that turns any digit into a picture as a person would send it.

Sources give black-on-white ``L`` images of one digit: ``type_digit`` (a glyph of a font file) and
``draw_digit`` (a hand-drawn shape from ``HAND``, with the wobble, slant and pen pressure of a person).
``DigitAugment`` frames such an image (digit size and position in the picture, rotation, shear,
aspect), changes its strokes (heavier, lighter, softer), paints it (paper and ink colours, either
polarity, uneven light, paper texture, noise, blur, JPEG) and hands the picture to the server's own
``preprocess``, so a training sample is made the way a served one is. Nothing here is random except
through the generator passed in.

Fonts are split by family: ``TRAIN_FONTS`` are the only ones training renders; ``HELD_OUT_FONTS``
(other families, none a clone of a training one) measure how the model reads fonts it never saw.
Both are Debian packages whose files lie under ``FONT_ROOT``.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from stageformer.core.preprocess import PreprocessConfig, preprocess

log = logging.getLogger(__name__)

FONT_ROOT = Path("/usr/share/fonts")
CANVAS = 96  # side of the images type_digit and draw_digit make, in pixels


# --- fonts ---------------------------------------------------------------------------------------


class MissingFontsError(RuntimeError):
    """Font packages the digits need are not installed; the message names the apt-get command."""


@dataclass(frozen=True)
class FontPackage:
    """A Debian font package and which of its files to use (globs under the font folder)."""

    name: str
    patterns: tuple[str, ...]
    exclude: tuple[str, ...] = ()  # file names without usable digits: symbols, dingbats, keyboard caps

    def files(self, root: Path) -> list[Path]:
        found = {p for pattern in self.patterns for p in root.glob(pattern) if p.name not in self.exclude}
        return sorted(found)


# Families training renders. Several are designed after another: their clones stay on this side.
TRAIN_FONTS = (
    FontPackage("fonts-dejavu-core", ("truetype/dejavu/DejaVuSans.ttf", "truetype/dejavu/DejaVuSans-Bold.ttf",
                                      "truetype/dejavu/DejaVuSansMono*.ttf", "truetype/dejavu/DejaVuSerif.ttf",
                                      "truetype/dejavu/DejaVuSerif-Bold.ttf")),
    FontPackage("fonts-dejavu-extra", ("truetype/dejavu/DejaVu*.ttf",), ("DejaVuMathTeXGyre.ttf",)),
    FontPackage("fonts-hack", ("truetype/hack/*.ttf",)),  # DejaVu Sans Mono's descendant
    FontPackage("fonts-liberation", ("truetype/liberation/*.ttf",)),
    FontPackage("fonts-freefont-ttf", ("truetype/freefont/*.ttf",)),
    FontPackage("fonts-urw-base35", ("opentype/urw-base35/*.otf",), ("D050000L.otf", "StandardSymbolsPS.otf")),
    FontPackage("fonts-cmu", ("truetype/cmu/*.ttf",)),
    FontPackage("fonts-linuxlibertine", ("opentype/linux-libertine/*.otf",), ("LinBiolinum_K.otf",)),
    FontPackage("fonts-go", ("fonts-go/*.ttf",)),
    FontPackage("fonts-comic-neue", ("opentype/comic-neue/*.otf",)),
    FontPackage("fonts-humor-sans", ("truetype/humor-sans/*.ttf",)),
    FontPackage("fonts-cantarell", ("opentype/cantarell/*.otf",)),
    FontPackage("fonts-quicksand", ("truetype/quicksand/*.ttf",)),
    FontPackage("fonts-sil-gentium", ("truetype/gentium/*.ttf",)),
    FontPackage("fonts-sil-andika", ("truetype/andika/*.ttf",)),
    FontPackage("fonts-league-spartan", ("opentype/league-spartan/*.otf",)),
    FontPackage("fonts-b612", ("opentype/b612/*.otf",)),
    FontPackage("fonts-karla", ("truetype/karla/*.otf",)),
    FontPackage("fonts-manrope", ("truetype/manrope/*.ttf",)),
    FontPackage("fonts-oxygen", ("truetype/oxygen/*.ttf",)),
    FontPackage("fonts-firacode", ("truetype/firacode/*.ttf",)),
    FontPackage("fonts-anonymous-pro", ("truetype/anonymous-pro/*.ttf",)),
    FontPackage("fonts-inconsolata", ("truetype/inconsolata/*.otf",)),
    FontPackage("fonts-noto-mono", ("truetype/noto/Noto*Mono*.ttf",)),
)  # fmt: skip

# Families no training run ever renders: common fonts of phones, offices and the web.
HELD_OUT_FONTS = (
    FontPackage(
        "fonts-roboto-unhinted", ("truetype/roboto/unhinted/RobotoTTF/*.ttf", "truetype/roboto/unhinted/*.ttf")
    ),
    FontPackage("fonts-open-sans", ("truetype/open-sans/*.ttf",)),
    FontPackage("fonts-lato", ("truetype/lato/*.ttf",)),
    FontPackage("fonts-crosextra-carlito", ("truetype/crosextra/Carlito-*.ttf",)),
    FontPackage("fonts-crosextra-caladea", ("truetype/crosextra/Caladea-*.ttf",)),
    FontPackage("fonts-inter", ("opentype/inter/*.otf",)),
    FontPackage("fonts-jetbrains-mono", ("truetype/jetbrains-mono/*.ttf",)),
    FontPackage("fonts-sil-charis", ("truetype/charis/*.ttf",)),
)


def apt_command(packages: Sequence[FontPackage]) -> str:
    return "apt-get install " + " ".join(p.name for p in packages)


def font_files(packages: Sequence[FontPackage], root: Path = FONT_ROOT) -> list[Path]:
    """The usable font files of ``packages``, sorted; raises ``MissingFontsError`` when a package has
    none (not installed), naming the apt-get command that installs all of them."""
    missing = [p.name for p in packages if not p.files(root)]
    if missing:
        raise MissingFontsError(
            f"font package(s) {', '.join(missing)} not found under {root}; install the digits' fonts with: "
            f"{apt_command(packages)}"
        )
    files = sorted({f for p in packages for f in p.files(root)})
    usable = [f for f in files if has_digits(f)]
    if len(usable) < len(files):
        log.info("skipping %d font file(s) without distinct digit glyphs", len(files) - len(usable))
    return usable


@functools.lru_cache(maxsize=1024)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    # The basic layout (no shaping engine): one digit needs none, and it renders the same everywhere.
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def type_digit(font: Path, digit: int, size: int = CANVAS) -> Image.Image:
    """``digit`` typed in ``font``: black on white, ``L``, ``size`` square, centred, the em 0.7 of the side."""
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    draw.text((size / 2, size / 2), str(digit), fill=0, font=_font(str(font), round(size * 0.7)), anchor="mm")
    return image


@functools.lru_cache(maxsize=1024)
def has_digits(font: Path) -> bool:
    """Whether ``font`` draws ten different, non-empty digits (symbol fonts and missing glyphs do not)."""
    try:
        glyphs = [type_digit(font, d, 48).tobytes() for d in range(10)]
    except OSError:
        return False
    blank = Image.new("L", (48, 48), 255).tobytes()
    return blank not in glyphs and len(set(glyphs)) == 10


# --- hand-drawn shapes ---------------------------------------------------------------------------

Point = tuple[float, float]
Piece = tuple[Point, ...]  # control points of one smooth run (two points: a straight line)
Stroke = tuple[Piece, ...]  # pieces meeting at corners: one movement of the pen
Shape = tuple[Stroke, ...]  # one way of writing a digit
Hand = dict[int, tuple[Shape, ...]]  # every digit's shapes


def arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float) -> Piece:
    """Points on an ellipse from angle ``start`` to ``end`` in degrees (0 = right, 90 = down, y grows
    downwards), one every 30 degrees or closer."""
    steps = max(2, math.ceil(abs(end - start) / 30) + 1)
    angles = np.radians(np.linspace(start, end, steps))
    return tuple((float(cx + rx * math.cos(a)), float(cy + ry * math.sin(a))) for a in angles)


def stroke(*parts: Piece) -> Stroke:
    """Pieces drawn in one movement; each piece after the first starts where the previous one ended."""
    pieces = [parts[0]]
    for part in parts[1:]:
        pieces.append((pieces[-1][-1], *part))
    return tuple(piece for piece in pieces if len(piece) > 1)


def polyline(*points: Point) -> Stroke:
    """Straight lines with sharp corners."""
    return tuple(itertools.pairwise(points))


# The training hand: 2 to 4 common ways of writing each digit, in a unit square with y downwards.
HAND: Hand = {
    0: (
        (stroke(arc(0.5, 0.5, 0.28, 0.42, -90, 270)),),
        (stroke(arc(0.5, 0.5, 0.24, 0.43, -60, 320)),),
        (stroke(arc(0.5, 0.5, 0.32, 0.4, -110, 250)),),
    ),
    1: (
        (polyline((0.5, 0.06), (0.5, 0.94)),),
        (polyline((0.3, 0.3), (0.54, 0.06), (0.54, 0.94)),),
        (polyline((0.32, 0.26), (0.54, 0.06), (0.54, 0.92)), polyline((0.3, 0.92), (0.78, 0.92))),
    ),
    2: (
        (stroke(arc(0.5, 0.3, 0.25, 0.23, 195, 400), ((0.22, 0.92),), ((0.8, 0.92),)),),
        (stroke(arc(0.5, 0.3, 0.26, 0.23, 190, 380), ((0.55, 0.6), (0.3, 0.8), (0.24, 0.9), (0.32, 0.94)),
                ((0.55, 0.86), (0.8, 0.9))),),
        (stroke(arc(0.5, 0.28, 0.24, 0.2, 200, 370), ((0.62, 0.5), (0.22, 0.92)), ((0.82, 0.9),)),),
    ),
    3: (
        (stroke(arc(0.47, 0.28, 0.24, 0.2, 205, 450), arc(0.47, 0.7, 0.27, 0.23, 270, 520)[1:]),),
        (stroke(((0.26, 0.1),), ((0.74, 0.1),), ((0.42, 0.42),), arc(0.46, 0.68, 0.27, 0.25, 260, 520)),),
        (stroke(arc(0.5, 0.29, 0.22, 0.21, 215, 430), ((0.4, 0.5),), arc(0.5, 0.71, 0.26, 0.22, 280, 510)),),
    ),
    4: (
        (polyline((0.56, 0.06), (0.2, 0.64), (0.84, 0.64)), polyline((0.66, 0.3), (0.66, 0.95))),
        (polyline((0.66, 0.95), (0.66, 0.06), (0.17, 0.64), (0.86, 0.64)),),
        (polyline((0.27, 0.08), (0.24, 0.56), (0.82, 0.56)), polyline((0.68, 0.08), (0.68, 0.95))),
    ),
    5: (
        (stroke(((0.3, 0.1),), ((0.27, 0.45),), arc(0.48, 0.66, 0.27, 0.27, 235, 500)[1:]),
         polyline((0.3, 0.1), (0.76, 0.1))),
        (stroke(((0.76, 0.1),), ((0.3, 0.1),), ((0.27, 0.46),), arc(0.48, 0.67, 0.26, 0.26, 235, 495)[1:]),),
        (stroke(((0.32, 0.08),), ((0.3, 0.42),), ((0.6, 0.44), (0.74, 0.66), (0.6, 0.9), (0.25, 0.86))),
         polyline((0.32, 0.08), (0.74, 0.06))),
    ),
    6: (
        (stroke(((0.7, 0.08), (0.46, 0.2), (0.28, 0.48), (0.26, 0.72)), arc(0.5, 0.7, 0.24, 0.23, 180, -180)[1:]),),
        (stroke(((0.62, 0.06),), ((0.3, 0.6),), arc(0.5, 0.72, 0.22, 0.21, 150, -190)[1:]),),
        (stroke(((0.66, 0.06), (0.36, 0.3), (0.27, 0.66)), arc(0.5, 0.68, 0.23, 0.26, 180, -170)[1:]),),
    ),
    7: (
        (polyline((0.22, 0.1), (0.8, 0.1), (0.42, 0.94)),),
        (polyline((0.22, 0.1), (0.8, 0.1), (0.42, 0.94)), polyline((0.36, 0.52), (0.72, 0.52))),
        (stroke(((0.22, 0.2),), ((0.24, 0.1),), ((0.8, 0.1),), ((0.56, 0.5), (0.46, 0.94))),),
    ),
    8: (
        (stroke(((0.68, 0.2), (0.5, 0.07), (0.32, 0.2), (0.36, 0.38), (0.5, 0.48), (0.68, 0.62), (0.71, 0.82),
                 (0.5, 0.94), (0.3, 0.82), (0.33, 0.62), (0.5, 0.48), (0.64, 0.37), (0.68, 0.2))),),
        (stroke(arc(0.5, 0.28, 0.19, 0.2, 0, 360)), stroke(arc(0.5, 0.71, 0.24, 0.23, -90, 270))),
        (stroke(((0.62, 0.12), (0.5, 0.07), (0.34, 0.18), (0.4, 0.4), (0.6, 0.58), (0.66, 0.8), (0.5, 0.93),
                 (0.33, 0.8), (0.4, 0.58), (0.62, 0.38), (0.66, 0.2), (0.6, 0.1))),),
    ),
    9: (
        (stroke(arc(0.48, 0.3, 0.22, 0.21, 10, -350), ((0.68, 0.95),)),),
        (stroke(arc(0.48, 0.3, 0.22, 0.22, 0, -360), ((0.7, 0.62), (0.62, 0.86), (0.42, 0.94))),),
        (stroke(arc(0.45, 0.3, 0.22, 0.21, 0, 360)), polyline((0.67, 0.3), (0.66, 0.95))),
        (stroke(arc(0.46, 0.3, 0.23, 0.2, 20, -330)), polyline((0.69, 0.26), (0.58, 0.95))),
    ),
}  # fmt: skip


def catmull_rom(points: np.ndarray, per_segment: int = 8) -> np.ndarray:
    """A smooth curve through ``points`` (n, 2): a uniform Catmull-Rom spline, ``per_segment`` samples
    per pair of points; two points give the straight line between them."""
    if len(points) < 3:
        t = np.linspace(0.0, 1.0, per_segment + 1)[:, None]
        return points[0] + t * (points[-1] - points[0])
    padded = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    t2, t3 = t * t, t * t * t
    out = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        out.append(
            0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (3 * p1 - p0 - 3 * p2 + p3) * t3)
        )
    out.append(points[-1:])
    return np.vstack(out)


def trace(stroke: Stroke) -> np.ndarray:
    """The pen's path along a stroke, (n, 2): each piece smoothed, corners kept."""
    runs = [catmull_rom(np.asarray(piece, dtype=np.float64)) for piece in stroke]
    return np.vstack([runs[0], *(run[1:] for run in runs[1:])])


@dataclass(frozen=True)
class Pen:
    """How a person's hand varies a shape: slant, rotation, width of the letters, wobble, pen width."""

    slant: float = 0.35  # horizontal shear, either way (a right-leaning hand shears the top to the right)
    rotate: float = 8.0  # degrees, either way
    narrow: tuple[float, float] = (0.65, 1.15)  # width scale
    wobble: tuple[float, float] = (0.0, 0.035)  # amplitude of a smooth random displacement, of the height
    drift: float = 0.02  # each stroke's own offset (strokes that do not quite meet), of the height
    width: tuple[float, float] = (0.035, 0.13)  # pen width, of the digit's height
    pressure: float = 0.3  # largest relative change of the width along a stroke

    def paths(self, shape: Shape, rng: np.random.Generator) -> list[np.ndarray]:
        """The strokes of ``shape`` as the hand draws them: slanted, rotated, wobbling, drifting."""
        slant, angle = rng.uniform(-self.slant, self.slant), math.radians(rng.uniform(-self.rotate, self.rotate))
        cos, sin, narrow = math.cos(angle), math.sin(angle), rng.uniform(*self.narrow)
        matrix = np.array([[cos, -sin], [sin, cos]]) @ np.array([[narrow, -slant], [0.0, 1.0]])
        amplitude = rng.uniform(*self.wobble)
        freq, phase = rng.uniform(0.5, 2.0, size=(2, 3, 2)), rng.uniform(0, 2 * math.pi, size=(2, 3))
        paths = []
        for part in shape:
            path = trace(part) + rng.normal(0.0, self.drift, size=2)
            wave = np.stack(
                [np.sin(2 * math.pi * (path @ freq[axis].T) + phase[axis]).sum(axis=1) for axis in range(2)], axis=1
            )
            path = path + amplitude / 3 * wave
            paths.append((path - 0.5) @ matrix.T)
        return paths


def draw_digit(
    digit: int, rng: np.random.Generator, hand: Hand = HAND, pen: Pen = Pen(), size: int = CANVAS
) -> Image.Image:
    """``digit`` written by a random person in one of the ``hand``'s shapes: black on white, ``L``,
    ``size`` square, the digit 0.8 of the side high and centred."""
    shape = hand[digit][int(rng.integers(len(hand[digit])))]
    paths = pen.paths(shape, rng)
    points = np.vstack(paths)
    low, high = points.min(axis=0), points.max(axis=0)
    scale = 0.8 * size / max(high[1] - low[1], 0.5 * (high[0] - low[0]), 1e-6)
    centre = (low + high) / 2
    radius = max(0.8, rng.uniform(*pen.width) * 0.8 * size / 2)
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    for path in paths:
        xy = (path - centre) * scale + size / 2
        _ink_path(draw, xy, radius, rng.uniform(0, pen.pressure), rng)
    return image


def _ink_path(
    draw: ImageDraw.ImageDraw, xy: np.ndarray, radius: float, pressure: float, rng: np.random.Generator
) -> None:
    """A round pen along ``xy``: discs no further apart than half their radius, the radius
    swelling and thinning smoothly along the way by up to ``pressure``."""
    steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    along = np.concatenate([[0.0], np.cumsum(steps)])
    count = max(2, int(along[-1] / max(radius / 2, 0.3)) + 1)
    at = np.linspace(0.0, along[-1], count)
    points = np.stack([np.interp(at, along, xy[:, 0]), np.interp(at, along, xy[:, 1])], axis=1)
    phase, cycles = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 2.0)
    radii = radius * (1 + pressure * np.sin(phase + 2 * math.pi * cycles * at / max(along[-1], 1e-6)))
    for (x, y), r in zip(points, radii, strict=True):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=0)


# --- from a digit to a picture -------------------------------------------------------------------


@dataclass(frozen=True)
class DigitAugment:
    """A black-on-white digit image -> the picture a person might send of it -> the server's
    ``preprocess`` -> ``uint8 [S, S, 3]``.

    With probability ``plain`` the image is only preprocessed. Otherwise the digit is cut out by its
    ink and framed in a square picture of a random side (``frame``, log-uniform): its height a
    fraction ``height`` of the side, rotated, sheared, stretched and moved off centre by a fraction
    of the free margin; its strokes may be made heavier, lighter or softer; then it is painted:
    paper and ink colours (pens, pencil, print), light ink on a dark ground (``invert``), uneven
    light and paper texture (``photo``), sensor noise, defocus blur and JPEG compression.
    """

    config: PreprocessConfig
    plain: float = 0.2
    frame: tuple[int, int] = (24, 160)  # side of the picture, pixels
    height: tuple[float, float] = (0.2, 0.95)  # digit height, of the side
    rotate: float = 12.0  # degrees, either way
    shear: float = 0.25  # horizontal shear, either way
    aspect: tuple[float, float] = (0.75, 1.3)  # width stretch
    offset: float = 0.7  # the largest move off centre, of the free margin
    weight: float = 0.5  # probability of heavier, lighter or softer strokes
    invert: float = 0.3  # probability of light ink on a dark ground
    photo: float = 0.4  # probability of uneven light and paper texture
    noise: float = 0.4  # probability of sensor noise
    blur: float = 0.3  # probability of defocus blur
    jpeg: float = 0.15  # probability of JPEG compression

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.plain:
            return preprocess(image, self.config)
        ink = ImageOps.invert(image.convert("L"))
        side = round(math.exp(rng.uniform(math.log(self.frame[0]), math.log(self.frame[1]))))
        coverage = self.frame_ink(ink, side, rng)
        if rng.random() < self.weight:
            coverage = reweigh(coverage, rng)
        picture = self.paint(coverage, rng)
        return preprocess(picture, self.config)

    def frame_ink(self, ink: Image.Image, side: int, rng: np.random.Generator) -> np.ndarray:
        """The ink cut to its bounding box and placed in a ``side`` square: float32 coverage in [0, 1]."""
        box = ink.getbbox() or (0, 0, *ink.size)
        glyph = ink.crop(box)
        height = rng.uniform(*self.height) * side
        stretch = math.exp(rng.uniform(math.log(self.aspect[0]), math.log(self.aspect[1])))
        scale = height / glyph.height
        width = max(1, round(glyph.width * scale * stretch))
        glyph = glyph.resize((width, max(1, round(height))), Image.Resampling.BILINEAR)
        angle = math.radians(rng.uniform(-self.rotate, self.rotate))
        shear = rng.uniform(-self.shear, self.shear)
        cos, sin = math.cos(angle), math.sin(angle)
        forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
        middle = np.array([glyph.width / 2, glyph.height / 2])
        corners = np.array([[0, 0], [glyph.width, 0], [0, glyph.height], [glyph.width, glyph.height]]) - middle
        extent = np.ptp(corners @ forward.T, axis=0)
        fit = min(1.0, 0.98 * side / max(extent.max(), 1e-6))  # rotation and shear may widen it past the frame
        forward = forward * fit
        margin = np.maximum(side - extent * fit, 0.0) / 2
        centre = side / 2 + rng.uniform(-1, 1, size=2) * margin * self.offset
        inverse = np.linalg.inv(forward)
        # Pillow maps each output pixel to an input one: input = inverse @ (output - centre) + glyph middle
        shift = middle - inverse @ centre
        coefficients = (inverse[0, 0], inverse[0, 1], shift[0], inverse[1, 0], inverse[1, 1], shift[1])
        placed = glyph.transform((side, side), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
        return np.asarray(placed, dtype=np.float32) / 255.0

    def paint(self, coverage: np.ndarray, rng: np.random.Generator) -> Image.Image:
        """Ink ``coverage`` on paper as an RGB picture: colours, polarity, light, texture, noise, blur, JPEG."""
        side = coverage.shape[0]
        paper, pen = colours(rng, inverted=rng.random() < self.invert)
        strength = rng.uniform(0.55, 1.0) if rng.random() < 0.5 else 1.0
        amount = (coverage * np.float32(strength))[..., None]
        picture = paper.astype(np.float32) + (pen - paper).astype(np.float32) * amount
        if rng.random() < self.photo:
            picture = picture * lighting(side, rng)[..., None] + texture(side, rng)[..., None]
        if rng.random() < self.noise:
            sigma = np.float32(rng.uniform(2.0, 14.0))
            picture = picture + rng.standard_normal(picture.shape, dtype=np.float32) * sigma
        image = Image.fromarray(np.clip(np.rint(picture), 0, 255).astype(np.uint8), mode="RGB")
        if rng.random() < self.blur:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2) * side / 40))
        if rng.random() < self.jpeg:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=int(rng.integers(25, 90)))
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return image


def reweigh(coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heavier or lighter strokes: blur the ink, then a steep curve at a random level (a low level
    fattens the strokes, a high one thins them; a gentle slope leaves soft edges)."""
    image = Image.fromarray(np.rint(coverage * 255).astype(np.uint8), mode="L")
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5) * coverage.shape[0] / 64))
    level, slope = rng.uniform(0.12, 0.6), rng.uniform(0.01, 0.12)
    blurred = np.asarray(image, dtype=np.float32) / 255.0
    out = 1.0 / (1.0 + np.exp(-(blurred - level) / slope))
    return np.clip((out - out.min()) / max(float(out.max() - out.min()), 1e-6), 0.0, 1.0).astype(np.float32)


def colours(rng: np.random.Generator, inverted: bool) -> tuple[np.ndarray, np.ndarray]:
    """Paper and ink RGB colours (float): white to grey or tinted paper, and black, blue, red or pencil
    ink; swapped in lightness when ``inverted`` (chalk on a board, light text on a dark screen)."""
    light = rng.uniform(175, 255) if rng.random() < 0.7 else 255.0
    paper = np.full(3, light) + (rng.uniform(-15, 15, size=3) if rng.random() < 0.3 else 0.0)
    kind = rng.random()
    if kind < 0.55:  # black or near black
        pen = np.full(3, rng.uniform(0, 70))
    elif kind < 0.75:  # blue pen
        pen = np.array([rng.uniform(0, 60), rng.uniform(10, 80), rng.uniform(100, 200)])
    elif kind < 0.82:  # red or green pen
        pen = np.roll(np.array([rng.uniform(140, 210), rng.uniform(0, 60), rng.uniform(0, 60)]), int(rng.integers(2)))
    else:  # pencil
        pen = np.full(3, rng.uniform(60, 140))
    if inverted:
        paper, pen = 255.0 - paper * rng.uniform(0.6, 1.0), 255.0 - pen * rng.uniform(0.5, 1.0)
    return np.clip(paper, 0, 255), np.clip(pen, 0, 255)


def lighting(side: int, rng: np.random.Generator) -> np.ndarray:
    """A light field (side, side) around 1: a gradient across the picture and, sometimes, a soft shadow."""
    axis = np.linspace(-0.5, 0.5, side, dtype=np.float32)
    y, x = axis[:, None], axis[None, :]
    angle = rng.uniform(0, 2 * math.pi)
    field = 1.0 + np.float32(rng.uniform(0.05, 0.45)) * (
        x * np.float32(math.cos(angle)) + y * np.float32(math.sin(angle))
    )
    if rng.random() < 0.4:
        cx, cy, r = (np.float32(v) for v in (rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.2, 0.6)))
        shadow = np.float32(rng.uniform(0.1, 0.4)) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        field = field * (1.0 - shadow)
    return field.astype(np.float32)


def texture(side: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth blotches of paper grain (side, side), in grey levels around 0."""
    coarse = rng.normal(0.0, rng.uniform(2.0, 10.0), size=(4, 4)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((side, side), Image.Resampling.BICUBIC))


# --- sources of training images --------------------------------------------------------------------


class Source(Protocol):
    """Images and labels by index (``model.data.ImageSource``, which this module cannot import: it is torch-free)."""

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image: ...

    def label(self, index: int) -> int: ...


class TypedDigits:
    """Every digit in every font of ``fonts``, black on white: index ``i`` is digit ``i % 10`` in
    font ``i // 10``."""

    def __init__(self, fonts: Sequence[Path]) -> None:
        self.fonts = list(fonts)

    def __len__(self) -> int:
        return 10 * len(self.fonts)

    def image(self, index: int) -> Image.Image:
        return type_digit(self.fonts[index // 10], index % 10)

    def label(self, index: int) -> int:
        return index % 10


class DrawnDigits:
    """``count`` digits written by ``draw_digit``, black on white: index ``i`` is digit ``i % 10``,
    drawn with the generator seeded by ``(seed, i)``, so the same every time."""

    def __init__(self, count: int, seed: int, hand: Hand = HAND, pen: Pen = Pen()) -> None:
        self.count, self.seed, self.hand, self.pen = count, seed, hand, pen

    def __len__(self) -> int:
        return self.count

    def image(self, index: int) -> Image.Image:
        return draw_digit(index % 10, np.random.default_rng((self.seed, index)), self.hand, self.pen)

    def label(self, index: int) -> int:
        return index % 10


class Concat:
    """Sources one after another, as one source (a source given twice is seen twice an epoch)."""

    def __init__(self, parts: Sequence[Source]) -> None:
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _locate(self, index: int) -> tuple[Source, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        part = int(np.searchsorted(self.ends, index, side="right"))
        return self.parts[part], index - (int(self.ends[part - 1]) if part else 0)

    def image(self, index: int) -> Image.Image:
        part, local = self._locate(index)
        return part.image(local)

    def label(self, index: int) -> int:
        part, local = self._locate(index)
        return part.label(local)
