"""The committed demo checkpoint (service/demo/digits.safetensors): what `stageformer train --preset digits
--data digits` produced. It must hold its accuracy on the held-out digits and read digits the way people
send them (dark ink on light paper, any size, grayscale or colour) through the server's preprocessing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from model import get_preset, load_checkpoint
from model.data import load_digits
from stageformer.core.preprocess import normalize, preprocess, stack

DEMO = Path(__file__).resolve().parents[2] / "service" / "demo" / "digits.safetensors"

# Hand-drawn strokes of each digit on a unit square (y down): polylines and ellipses.
STROKES: dict[int, list[tuple[str, list[float]]]] = {
    0: [("ellipse", [0.28, 0.1, 0.72, 0.9])],
    1: [("line", [0.38, 0.25, 0.52, 0.1, 0.52, 0.9])],
    2: [("line", [0.25, 0.3, 0.35, 0.15, 0.5, 0.1, 0.65, 0.15, 0.72, 0.3, 0.65, 0.45, 0.25, 0.9, 0.78, 0.9])],
    3: [("line", [0.25, 0.15, 0.7, 0.15, 0.45, 0.45, 0.7, 0.6, 0.72, 0.78, 0.5, 0.9, 0.25, 0.85])],
    4: [("line", [0.62, 0.9, 0.62, 0.1, 0.2, 0.65, 0.8, 0.65])],
    5: [("line", [0.72, 0.1, 0.32, 0.1, 0.28, 0.45, 0.5, 0.4, 0.7, 0.5, 0.72, 0.72, 0.55, 0.9, 0.25, 0.85])],
    6: [("line", [0.65, 0.1, 0.4, 0.3, 0.28, 0.6, 0.3, 0.8, 0.5, 0.9, 0.7, 0.8, 0.7, 0.6, 0.5, 0.5, 0.3, 0.6])],
    7: [("line", [0.25, 0.1, 0.75, 0.1, 0.42, 0.9])],
    8: [("ellipse", [0.32, 0.1, 0.68, 0.5]), ("ellipse", [0.27, 0.5, 0.73, 0.9])],
    9: [("ellipse", [0.3, 0.1, 0.7, 0.5]), ("line", [0.7, 0.3, 0.62, 0.9])],
}
BLACK, WHITE, BLUE, CREAM = (0, 0, 0), (255, 255, 255), (25, 40, 160), (248, 244, 232)


def draw_strokes(
    digit: int, size: int, width: int, ink: tuple[int, int, int], paper: tuple[int, int, int]
) -> Image.Image:
    image = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(image)
    for kind, coords in STROKES[digit]:
        points = [v * size for v in coords]
        if kind == "line":
            draw.line(points, fill=ink, width=width, joint="curve")
        else:
            draw.ellipse(points, outline=ink, width=width)
    return image


def draw_text(digit: int, height: int, width: int, fill: float, ink: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), WHITE)
    font = ImageFont.load_default(size=round(height * fill))  # Pillow's bundled font: the same everywhere
    ImageDraw.Draw(image).text((width / 2, height / 2), str(digit), fill=ink, font=font, anchor="mm")
    return image


def renderings() -> Iterator[tuple[str, int, Image.Image]]:
    """Each digit drawn 12 ways: strokes and type, 28 to 500 pixels, thin to bold, gray and coloured."""
    for d in range(10):
        for size, width in ((28, 3), (64, 6), (200, 16), (300, 10), (500, 30)):
            yield f"strokes {size}px w{width}", d, draw_strokes(d, size, width, BLACK, WHITE)
        yield "strokes blue on cream", d, draw_strokes(d, 120, 10, BLUE, CREAM)
        yield "strokes grayscale", d, draw_strokes(d, 120, 10, BLACK, WHITE).convert("L")
        yield "type 28px", d, draw_text(d, 28, 28, 0.9, BLACK)
        yield "type 64px", d, draw_text(d, 64, 64, 0.8, BLACK)
        yield "type 200x320 grayscale", d, draw_text(d, 200, 320, 0.7, BLACK).convert("L")
        yield "type 120px blue", d, draw_text(d, 120, 120, 0.8, BLUE)
        yield "type 400px small", d, draw_text(d, 400, 400, 0.5, BLACK)


@pytest.fixture(scope="module")
def demo():
    if not DEMO.is_file():
        pytest.fail(f"{DEMO} is missing; train it with `stageformer train --preset digits --data digits`")
    return load_checkpoint(DEMO)


def test_demo_checkpoint_is_the_digits_preset(demo) -> None:
    preset = get_preset("digits")
    assert demo.config == preset.config
    assert demo.preprocess == preset.preprocess
    assert demo.labels == [str(i) for i in range(10)]
    assert DEMO.stat().st_size < 2_000_000


def test_demo_reaches_97_percent_on_the_held_out_digits(demo) -> None:
    pytest.importorskip("sklearn")
    held_out = load_digits(demo.preprocess).val
    pixels = stack([preprocess(held_out.image(i), demo.preprocess) for i in range(len(held_out))])
    with torch.no_grad():
        predicted = demo.model(torch.from_numpy(normalize(pixels, demo.preprocess))).argmax(dim=1).numpy()
    labels = np.array([held_out.label(i) for i in range(len(held_out))])
    assert (predicted == labels).mean() >= 0.97


def test_demo_reads_drawn_and_typed_digits(demo) -> None:
    cases = list(renderings())
    pixels = stack([preprocess(image, demo.preprocess) for _, _, image in cases])
    with torch.no_grad():
        predicted = demo.model(torch.from_numpy(normalize(pixels, demo.preprocess))).argmax(dim=1).tolist()
    wrong = [f"{name}: {d} read as {p}" for (name, d, _), p in zip(cases, predicted, strict=True) if p != d]
    strokes = [p == d for (name, d, _), p in zip(cases, predicted, strict=True) if name.startswith("strokes")]
    # Committed checkpoint: 69/70 drawn, 29/50 typed. Typed glyphs are the weak spot (the training digits
    # are 8x8 handwriting; a thin typed 6, 8 or 9 tends to read as 0), hence the lower bar overall.
    assert sum(strokes) / len(strokes) >= 0.9, wrong
    assert 1 - len(wrong) / len(cases) >= 0.75, wrong
