"""The demo's digits data: fonts from Debian packages split into training and held-out families, the hands
that draw digits, the augmentation that turns a digit into a picture, the training split, the held-out sets,
the polarity and framing modules of the study, and the page's samples."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.digits_demo import SAMPLES_JS, samples, samples_script
from model.data import DIGITS_DRAWN, DIGITS_HANDWRITTEN_REPEAT, DIGITS_TYPED_REPEAT, load_data
from model.digits import (
    CANVAS,
    HAND,
    HELD_OUT_FONTS,
    TRAIN_FONTS,
    Concat,
    DigitAugment,
    DrawnDigits,
    MissingFontsError,
    TypedDigits,
    draw_digit,
    font_files,
    has_digits,
    type_digit,
)
from model.digits_eval import HELD_OUT_HAND, SERVER_OVERSAMPLE, drawn_cases, photo_cases, typed_cases
from model.digits_study import FramingNorm, PolarityNorm
from model.presets import get_preset
from stageformer.core.preprocess import normalize, preprocess

ROOT = Path(__file__).resolve().parents[2]
CONFIG = get_preset("digits").preprocess


def ink_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box of the pixels that differ from the corner pixel by more than a third of the range."""
    gray = pixels.astype(np.float32).mean(axis=-1) if pixels.ndim == 3 else pixels.astype(np.float32)
    ys, xs = np.nonzero(np.abs(gray - gray[0, 0]) > 85)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --- fonts ---------------------------------------------------------------------------------------------------


def test_training_and_held_out_fonts_are_installed_and_apart() -> None:
    train, held_out = font_files(TRAIN_FONTS), font_files(HELD_OUT_FONTS)
    assert len(train) >= 150 and len(held_out) >= 80
    assert not set(train) & set(held_out)
    assert not {p.name for p in TRAIN_FONTS} & {p.name for p in HELD_OUT_FONTS}
    assert all(has_digits(f) for f in train + held_out)


def test_ci_installs_every_font_package_the_digits_need() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    installed = set(re.findall(r"\bfonts-[a-z0-9-]+", script))
    needed = {p.name for p in TRAIN_FONTS + HELD_OUT_FONTS}
    assert needed <= installed, sorted(needed - installed)


def test_a_missing_font_package_names_the_apt_get_command(tmp_path: Path) -> None:
    with pytest.raises(MissingFontsError, match=r"apt-get install fonts-dejavu-core fonts-dejavu-extra"):
        font_files(TRAIN_FONTS, root=tmp_path)


def test_fonts_without_digits_are_left_out(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ttf"
    broken.write_bytes(b"not a font")
    assert not has_digits(broken)
    dingbats = Path("/usr/share/fonts/opentype/urw-base35/D050000L.otf")  # its digit codes draw pictures
    assert dingbats.is_file() and dingbats not in font_files(TRAIN_FONTS)


def test_typed_digits_are_black_on_white_and_centred() -> None:
    font = next(f for f in font_files(TRAIN_FONTS) if f.name == "DejaVuSans.ttf")
    image = type_digit(font, 8)
    assert image.mode == "L" and image.size == (CANVAS, CANVAS)
    pixels = np.asarray(image)
    assert pixels.max() == 255 and pixels.min() == 0 and np.median(pixels) == 255
    left, top, right, bottom = ink_box(pixels)
    assert abs((left + right) / 2 - CANVAS / 2) < 4 and abs((top + bottom) / 2 - CANVAS / 2) < 6
    assert np.array_equal(pixels, np.asarray(type_digit(font, 8)))


# --- drawn digits ----------------------------------------------------------------------------------------------


def test_hands_write_every_digit_in_shapes_of_their_own() -> None:
    assert sorted(HAND) == sorted(HELD_OUT_HAND) == list(range(10))
    assert all(len(HAND[d]) >= 2 and len(HELD_OUT_HAND[d]) >= 2 for d in range(10))
    assert not {s for d in HAND for s in HAND[d]} & {s for d in HELD_OUT_HAND for s in HELD_OUT_HAND[d]}


def test_drawn_digits_are_the_same_for_the_same_seed_and_vary_between_seeds() -> None:
    first = np.asarray(draw_digit(3, np.random.default_rng(5)))
    assert np.array_equal(first, np.asarray(draw_digit(3, np.random.default_rng(5))))
    others = [np.asarray(draw_digit(3, np.random.default_rng(seed))) for seed in range(6, 12)]
    assert all(not np.array_equal(first, other) for other in others)
    _, top, _, bottom = ink_box(first)
    assert 0.75 * CANVAS <= bottom - top <= 0.92 * CANVAS  # 0.8 of the side high, plus the pen's width


# --- augmentation ---------------------------------------------------------------------------------------------


def test_augmentation_makes_served_size_pictures_of_every_kind() -> None:
    augment = DigitAugment(CONFIG)
    source = draw_digit(7, np.random.default_rng(0))
    outputs = [augment(source, np.random.default_rng(seed)) for seed in range(300)]
    assert all(o.dtype == np.uint8 and o.shape == (24, 24, 3) for o in outputs)
    assert np.array_equal(outputs[0], augment(source, np.random.default_rng(0)))
    # Polarity: the border is darker than the middle in about `invert` of them (plain ones never).
    dark_ground = [o[[0, -1]].mean() + o[:, [0, -1]].mean() < 2 * o.mean() for o in outputs]
    assert 0.18 <= np.mean(dark_ground) <= 0.4
    # Colour: in some pictures the ink is clearly not grey (blue, red, green pens: about a fifth).
    assert 30 < sum(int(np.ptp(o.astype(int), axis=2).max()) > 60 for o in outputs) < 100


def test_framing_puts_the_digit_at_any_size_inside_the_picture() -> None:
    augment = DigitAugment(CONFIG, rotate=0.0, shear=0.0)
    ink = Image.eval(draw_digit(1, np.random.default_rng(0)), lambda v: 255 - v)
    heights = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        coverage = augment.frame_ink(ink, 100, rng)
        assert coverage.shape == (100, 100) and coverage.max() > 0.5
        left, top, right, bottom = ink_box(np.rint(coverage * 255).astype(np.uint8))
        assert left >= 0 and top >= 0 and right <= 100 and bottom <= 100
        heights.append(bottom - top)
    assert min(heights) < 40 and max(heights) > 85  # from a third of the picture to nearly all of it


# --- the training split and the held-out sets ------------------------------------------------------------------


def test_the_digits_data_is_handwritten_typed_and_drawn() -> None:
    pytest.importorskip("sklearn")
    splits = load_data("digits", CONFIG)
    fonts = font_files(TRAIN_FONTS)
    assert len(splits.train) == 1438 * DIGITS_HANDWRITTEN_REPEAT + 10 * len(fonts) * DIGITS_TYPED_REPEAT + DIGITS_DRAWN
    assert len(splits.val) == 359 and isinstance(splits.augment, DigitAugment)
    typed_start = 1438 * DIGITS_HANDWRITTEN_REPEAT
    assert [splits.train.label(typed_start + i) for i in range(12)] == [*range(10), 0, 1]
    assert np.array_equal(np.asarray(splits.train.image(typed_start + 13)), np.asarray(type_digit(fonts[1], 3)))
    last = len(splits.train) - 1
    assert splits.train.label(last) == (DIGITS_DRAWN - 1) % 10
    with pytest.raises(IndexError):
        splits.train.image(len(splits.train))


def test_concat_maps_indices_onto_its_parts() -> None:
    font = font_files(TRAIN_FONTS)[:2]
    joined = Concat([TypedDigits(font), DrawnDigits(5, seed=3), TypedDigits(font[:1])])
    assert len(joined) == 20 + 5 + 10
    assert [joined.label(i) for i in (0, 19, 20, 24, 25, 34)] == [0, 9, 0, 4, 0, 9]
    drawn = DrawnDigits(5, seed=3)
    assert np.array_equal(np.asarray(joined.image(22)), np.asarray(drawn.image(2)))


def test_held_out_sets_are_fixed_and_use_only_held_out_fonts() -> None:
    fonts = font_files(HELD_OUT_FONTS)[:4]
    first, again = typed_cases(fonts), typed_cases(fonts)
    assert len(first) == 40 and [c.label for c in first] == [d for _ in fonts for d in range(10)]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again, strict=True))
    inverted = [c for c in typed_cases() if c.inverted]
    assert 0.25 < len(inverted) / len(typed_cases()) < 0.42
    for case in inverted[:20]:  # light on dark: the corner is darker than the brightest ink
        pixels = np.asarray(case.image.convert("L"))
        assert pixels[0, 0] < 60 and pixels.max() > 190
    drawn, photos = drawn_cases(per_shape=1), photo_cases(per_shape=1)
    shapes = sum(len(s) for s in HELD_OUT_HAND.values())
    assert len(drawn) == len(photos) == shapes
    assert all(min(c.image.size) >= 100 for c in drawn + photos)


def test_held_out_pictures_reach_the_model_as_through_the_server() -> None:
    from service.images import prepare
    from service.settings import Settings

    fields = Settings.model_fields
    assert (fields["decode"].default, fields["decode_oversample"].default) == ("fast", SERVER_OVERSAMPLE)
    photos = [c for c in photo_cases(per_shape=1) if min(c.image.size) >= 4 * CONFIG.resize_size]
    assert photos and all(c.jpeg is not None for c in photos)
    for case in photos[:5]:  # large enough for the server to decode at a reduced scale
        assert case.jpeg is not None
        served = prepare(case.jpeg, CONFIG, 10**8, oversample=SERVER_OVERSAMPLE)
        assert np.array_equal(case.pixels(CONFIG), served)
        assert np.array_equal(case.pixels(CONFIG, oversample=None), prepare(case.jpeg, CONFIG, 10**8))
    drawing = drawn_cases(per_shape=1)[0]
    assert drawing.jpeg is None and np.array_equal(drawing.pixels(CONFIG), preprocess(drawing.image, CONFIG))


# --- the study's polarity and framing modules ------------------------------------------------------------------


def normalized(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(normalize(preprocess(image, CONFIG)[None], CONFIG))


def test_polarity_norm_turns_light_on_dark_into_dark_on_light() -> None:
    digit = draw_digit(4, np.random.default_rng(0), size=24).convert("RGB")  # the input size: no resampling
    upright, inverted = normalized(digit), normalized(Image.eval(digit, lambda v: 255 - v))
    assert torch.equal(PolarityNorm()(upright), upright)
    assert torch.allclose(PolarityNorm()(inverted), upright, atol=1e-6)


def test_polarity_norm_keeps_a_photographed_page_with_dark_edges() -> None:
    # A page in a dark frame (a shadow, the table around it): its border is darker than its middle, yet the
    # ink is dark on light, and stays so.
    page = np.asarray(draw_digit(6, np.random.default_rng(1), size=24), dtype=np.float32)
    y, x = np.mgrid[0:24, 0:24] / 23 - 0.5
    shaded = page * np.clip(1.25 - 1.6 * np.maximum(np.abs(x), np.abs(y)), 0.3, 1.0)
    picture = Image.fromarray(np.rint(shaded).astype(np.uint8)).convert("RGB")
    tensor = normalized(picture)
    gray = tensor[0].mean(dim=0)
    assert torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]]).mean() < gray.mean()  # the edges are dark
    assert torch.equal(PolarityNorm()(tensor), tensor)


def test_framing_norm_fills_the_frame_with_a_small_digit() -> None:
    small = Image.new("L", (240, 240), 255)
    small.paste(draw_digit(2, np.random.default_rng(0), size=60), (70, 110))
    framed = FramingNorm()(normalized(small.convert("RGB")))
    pixels = np.rint((framed[0].numpy().transpose(1, 2, 0) * 0.5 + 0.5) * 255).astype(np.uint8)
    before = ink_box(preprocess(small.convert("RGB"), CONFIG))
    after = ink_box(pixels)
    assert before[3] - before[1] <= 6 and after[3] - after[1] >= 14
    assert abs((after[0] + after[2]) / 2 - 12) <= 2 and abs((after[1] + after[3]) / 2 - 12) <= 2


# --- the page's samples ----------------------------------------------------------------------------------------


def test_the_page_samples_are_the_ones_the_generator_makes() -> None:
    text = SAMPLES_JS.read_text()
    assert text.startswith(samples_script([]).split("[")[0])
    entries = json.loads(text[text.index("[") : text.rindex("]") + 1])
    made = samples()
    assert [(e["name"], e["type"], e["description"], e["label"]) for e in entries] == [
        (s.name, s.type, s.description, str(s.label)) for s in made
    ], "run `python -m export.digits_demo samples`"
    for entry, sample in zip(entries, made, strict=True):  # the same pictures, whatever the codec's version
        shipped = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["data"]))).convert("RGB"), dtype=float)
        fresh = np.asarray(Image.open(io.BytesIO(sample.data)).convert("RGB"), dtype=float)
        assert shipped.shape == fresh.shape and np.abs(shipped - fresh).mean() < 2
