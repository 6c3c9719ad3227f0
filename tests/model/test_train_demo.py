"""The committed demo model (service/demo/digits.safetensors and digits.onnx): what the recipe in
docs/training.md ("The demo model") produced. Through the server's preprocessing it must read digits as
people send them: scikit-learn's held-out digits, digits typed in font families training never saw, digits
drawn on a canvas and handwritten digits photographed on paper, dark on light or light on dark; its
metadata and that section must state what it scores; and it must stay small and fast."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from export import read_onnx_metadata
from export.digits_demo import ACCURACY_KEY, COUNTS_KEY, FONTS_KEY, onnx_accuracy
from model import get_preset, load_checkpoint
from model.data import load_digits
from model.digits_eval import SOURCES, Case, held_out_cases
from stageformer.core.preprocess import normalize, preprocess, stack

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "service" / "demo" / "digits.safetensors"
DEMO_ONNX = ROOT / "service" / "demo" / "digits.onnx"
# The targets (scikit-learn, typed in unseen fonts, drawn), and bars for photographs of paper and for digits
# typed small in the picture (a fifth to a third of its height), a few points under what the model scores.
TARGETS = {"sklearn": 0.97, "typed": 0.95, "typed-small": 0.85, "drawn": 0.95, "photo": 0.90}

# Hand-drawn strokes of each digit on a unit square (y down): polylines and ellipses. A third hand, written
# for this test alone (training draws model.digits.HAND, model.digits_eval holds another).
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
    """Each digit drawn 16 ways: strokes and type, 28 to 500 pixels, thin to bold, grey, coloured and inverted."""
    for d in range(10):
        for size, width in ((28, 3), (64, 6), (200, 16), (300, 10), (500, 30)):
            yield f"strokes {size}px w{width}", d, draw_strokes(d, size, width, BLACK, WHITE)
        yield "strokes blue on cream", d, draw_strokes(d, 120, 10, BLUE, CREAM)
        yield "strokes grayscale", d, draw_strokes(d, 120, 10, BLACK, WHITE).convert("L")
        yield "strokes white on black", d, draw_strokes(d, 160, 12, WHITE, BLACK)
        yield "strokes small in a large frame", d, ImageOps.expand(draw_strokes(d, 90, 7, BLACK, WHITE), 75, WHITE)
        yield "type 28px", d, draw_text(d, 28, 28, 0.9, BLACK)
        yield "type 64px", d, draw_text(d, 64, 64, 0.8, BLACK)
        yield "type 200x320 grayscale", d, draw_text(d, 200, 320, 0.7, BLACK).convert("L")
        yield "type 120px blue", d, draw_text(d, 120, 120, 0.8, BLUE)
        yield "type 400px small", d, draw_text(d, 400, 400, 0.5, BLACK)
        yield "type inverted", d, ImageOps.invert(draw_text(d, 96, 96, 0.8, BLACK))
        dark_screen = ImageOps.invert(draw_text(d, 80, 80, 0.7, (40, 40, 40))).point(lambda v: 30 + v * 4 // 5)
        yield "type on a dark screen", d, dark_screen


@pytest.fixture(scope="module")
def demo() -> Any:
    if not DEMO.is_file():
        pytest.fail(f"{DEMO} is missing; build it with the recipe in docs/training.md ('The demo model')")
    return load_checkpoint(DEMO)


@pytest.fixture(scope="module")
def cases(demo: Any) -> list[Case]:
    pytest.importorskip("sklearn")
    return held_out_cases(demo.preprocess)


@pytest.fixture(scope="module")
def measured(cases: list[Case]) -> dict[str, float]:
    """Fraction right per held-out source of the ONNX file, as the server would run it."""
    return onnx_accuracy(DEMO_ONNX, cases)


def test_demo_checkpoint_is_the_digits_preset(demo: Any) -> None:
    preset = get_preset("digits")
    assert demo.config == preset.config
    assert demo.preprocess == preset.preprocess
    assert demo.labels == [str(i) for i in range(10)]
    assert DEMO.stat().st_size < 2_000_000 and DEMO_ONNX.stat().st_size < 2_000_000
    meta = read_onnx_metadata(DEMO_ONNX)
    assert (meta["name"], meta["input_format"], meta["precision"]) == ("digits", "raw", "fp32")
    assert json.loads(meta["preprocess"]) == json.loads(demo.preprocess.to_json())


def test_demo_reaches_97_percent_on_the_held_out_digits(demo: Any) -> None:
    pytest.importorskip("sklearn")
    held_out = load_digits(demo.preprocess).val
    pixels = stack([preprocess(held_out.image(i), demo.preprocess) for i in range(len(held_out))])
    with torch.no_grad():
        predicted = demo.model(torch.from_numpy(normalize(pixels, demo.preprocess))).argmax(dim=1).numpy()
    labels = np.array([held_out.label(i) for i in range(len(held_out))])
    assert (predicted == labels).mean() >= TARGETS["sklearn"]


def test_demo_reads_each_held_out_source(measured: dict[str, float]) -> None:
    short = {s: f"{measured[s]:.3f}" for s in SOURCES if measured[s] < TARGETS[s]}
    assert not short, f"below target: {short}; all: {measured}"
    # Light on dark is read about as well as dark on light, not merely on average.
    for source in ("typed", "drawn"):
        assert measured[f"{source}/inverted"] >= TARGETS[source] - 0.03, measured


def test_metadata_and_readme_state_the_measured_figures(
    demo: Any, cases: list[Case], measured: dict[str, float]
) -> None:
    for metadata in (demo.metadata, json.loads(read_onnx_metadata(DEMO_ONNX)["checkpoint_metadata"])):
        stated, counts = json.loads(metadata[ACCURACY_KEY]), json.loads(metadata[COUNTS_KEY])
        assert counts == {s: sum(c.source == s for c in cases) for s in SOURCES}
        for source in SOURCES:  # measured with PyTorch when written; ONNX may flip one near tie
            assert abs(stated[source] - measured[source]) * counts[source] <= 1.5, (source, stated, measured)
        assert "fonts-dejavu-core" in json.loads(metadata[FONTS_KEY])
    docs = (ROOT / "docs" / "training.md").read_text()  # README's "Training" link leads there
    section = docs[docs.index("## The demo model") :]
    end = section.find("\n## ", 3)
    section = section if end == -1 else section[:end]
    stated = json.loads(demo.metadata[ACCURACY_KEY])
    for source in SOURCES:
        assert re.search(rf"^\| {source} \|.*\| {100 * stated[source]:.1f}% \|$", section, re.MULTILINE), source


def test_demo_reads_drawn_and_typed_digits(demo: Any) -> None:
    cases = list(renderings())
    pixels = stack([preprocess(image, demo.preprocess) for _, _, image in cases])
    with torch.no_grad():
        predicted = demo.model(torch.from_numpy(normalize(pixels, demo.preprocess))).argmax(dim=1).tolist()
    wrong = [f"{name}: {d} read as {p}" for (name, d, _), p in zip(cases, predicted, strict=True) if p != d]
    strokes = [p == d for (name, d, _), p in zip(cases, predicted, strict=True) if name.startswith("strokes")]
    typed = [p == d for (name, d, _), p in zip(cases, predicted, strict=True) if name.startswith("type")]
    assert sum(strokes) / len(strokes) >= 0.95, wrong
    assert sum(typed) / len(typed) >= 0.95, wrong


def test_demo_loads_fast_and_answers_one_image_in_milliseconds() -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    started = time.perf_counter()
    session = ort.InferenceSession(str(DEMO_ONNX), options, providers=["CPUExecutionProvider"])
    loaded = time.perf_counter() - started
    image = np.full((1, 24, 24, 3), 255, dtype=np.uint8)
    session.run(None, {"image": image})
    timings = []
    for _ in range(50):
        started = time.perf_counter()
        session.run(None, {"image": image})
        timings.append(time.perf_counter() - started)
    # Typically ~50 ms to load and ~1 ms a run on one core; the bounds leave room for a busy machine.
    assert loaded < 1.0, f"loading took {loaded:.2f} s"
    assert float(np.median(timings)) < 0.010, f"median {1000 * np.median(timings):.1f} ms"
