"""The shipped demo model (``service/demo/``), from a trained checkpoint: judged on the held-out
digits, the figures written into its metadata, exported to ONNX, copied beside the server. Also
writes the sample pictures of the page (``service/static/samples.js``).

The whole recipe (README, "The demo model")::

    apt-get install <the packages of model.digits.TRAIN_FONTS and HELD_OUT_FONTS>
    stageformer train --preset digits --data digits --out runs/digits
    python -m export.digits_demo finish runs/digits/last.safetensors --out runs/digits --ship

``finish`` writes ``digits.safetensors`` and ``digits.onnx`` to ``--out`` (and, with ``--ship``, to
``service/demo/``). Their metadata key ``held_out_accuracy`` holds the fraction right per held-out
source (``model.digits_eval``), measured on the ONNX file through the server's preprocessing.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.digits import HELD_OUT_FONTS, TRAIN_FONTS, font_files
from model.digits_eval import (
    HELD_OUT_HAND,
    SOURCES,
    Case,
    accuracy_by_source,
    canvas_drawing,
    held_out_cases,
    photograph,
    predictions,
    typed_case,
)
from stageformer.core.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "service" / "demo"
SAMPLES_JS = ROOT / "service" / "static" / "samples.js"
NAME = "digits"  # the model's name when served, and the files' stem
ACCURACY_KEY = "held_out_accuracy"  # metadata: JSON {source: fraction right}
COUNTS_KEY = "held_out_counts"  # metadata: JSON {source: pictures}
FONTS_KEY = "train_font_packages"  # metadata: JSON list of the Debian packages training rendered


def onnx_predictor(path: Path) -> tuple[object, PreprocessConfig]:
    """An ONNX Runtime session on one CPU thread for ``path`` and the preprocessing its metadata names."""
    import onnxruntime as ort

    from export import read_onnx_metadata

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, PreprocessConfig.from_json(read_onnx_metadata(path)["preprocess"])


def onnx_accuracy(path: Path, cases: Sequence[Case]) -> dict[str, float]:
    """Fraction right per source of the ONNX model at ``path``, each picture preprocessed as the server does."""
    session, config = onnx_predictor(path)
    name = session.get_inputs()[0].name  # type: ignore[attr-defined]

    def predict(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: pixels})[0]).argmax(axis=1)  # type: ignore[attr-defined]

    return accuracy_by_source(cases, predictions(predict, cases, config))


def torch_accuracy(checkpoint: Checkpoint, cases: Sequence[Case]) -> dict[str, float]:
    """Fraction right per source of a loaded checkpoint, each picture preprocessed as the server does."""
    import torch

    from stageformer.core.preprocess import normalize

    def predict(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return checkpoint.model(torch.from_numpy(normalize(pixels, checkpoint.preprocess))).argmax(dim=1).numpy()

    return accuracy_by_source(cases, predictions(predict, cases, checkpoint.preprocess))


def finish(checkpoint: Path, out: Path, ship: bool) -> dict[str, float]:
    """Judge ``checkpoint`` on the held-out sets, save it with the figures as ``out/digits.safetensors``,
    export that to ``out/digits.onnx`` and check the ONNX file scores the same; copy both to
    ``service/demo/`` when ``ship``. Returns the fractions right per source."""
    from export import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(checkpoint)
    cases = held_out_cases(loaded.preprocess)
    accuracy = torch_accuracy(loaded, cases)
    counts = {s: sum(c.source == s for c in cases) for s in SOURCES}
    keep = {k: v for k, v in loaded.metadata.items() if k in ("epoch", "val_accuracy", "train_data")}
    extra = {
        **keep,
        ACCURACY_KEY: json.dumps(_rounded(accuracy)),
        COUNTS_KEY: json.dumps(counts),
        FONTS_KEY: json.dumps([p.name for p in TRAIN_FONTS]),
    }
    target, onnx_path = out / f"{NAME}.safetensors", out / f"{NAME}.onnx"
    save_checkpoint(loaded.model, target, loaded.preprocess, loaded.labels, extra=extra)
    export_onnx(target, onnx_path, name=NAME)
    exported = onnx_accuracy(onnx_path, cases)
    for source in counts:  # the parity gate allows 1e-4 in the logits: a near tie may flip, no more
        if abs(exported[source] - accuracy[source]) * counts[source] > 1.5:
            raise RuntimeError(f"{onnx_path} scores {exported[source]:.4f} on {source}, PyTorch {accuracy[source]:.4f}")
    for source, value in accuracy.items():
        log.info("held out %-22s %.2f%% (ONNX %.2f%%)", source, 100 * value, 100 * exported[source])
    if ship:
        DEMO.mkdir(parents=True, exist_ok=True)
        for path in (target, onnx_path):
            shutil.copyfile(path, DEMO / path.name)
        log.info("copied %s and %s to %s", target.name, onnx_path.name, DEMO)
    return accuracy


def _rounded(accuracy: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in sorted(accuracy.items())}


# --- the page's samples ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A picture built into the page: its file name, MIME type, what it shows, its digit, its bytes."""

    name: str
    type: str
    description: str
    label: int
    data: bytes


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {"optimize": True}))
    return buffer.getvalue()


def samples(seed: int = 5) -> list[Sample]:
    """Three pictures unlike one another, none from training: a handwritten 4 photographed on paper,
    a 5 typed in a held-out font, light on dark, and a 2 drawn on a canvas."""
    from model.digits import draw_digit
    from model.digits_eval import PHOTO_PEN

    rng = np.random.default_rng(seed)
    ink = draw_digit(4, rng, {4: HELD_OUT_HAND[4][1:2]}, PHOTO_PEN, size=160)
    photo = Image.open(io.BytesIO(photograph(ink, rng))).resize((128, 128), Image.Resampling.LANCZOS)
    font = next(f for f in font_files(HELD_OUT_FONTS) if f.name == "Roboto-Bold.ttf")
    typed = typed_case(font, 5, rng, inverted=True, size=(0.75, 0.75)).resize((96, 96), Image.Resampling.LANCZOS)
    drawing = canvas_drawing(HELD_OUT_HAND[2][0], rng, inverted=False).resize((128, 128), Image.Resampling.LANCZOS)
    return [
        Sample("photo-of-a-4.jpg", "image/jpeg", "a 4 on paper, photographed", 4, _encoded(photo, "JPEG")),
        Sample("typed-5-dark.png", "image/png", "a typed 5, light on dark", 5, _encoded(typed, "PNG")),
        Sample("drawn-2.png", "image/png", "a 2 drawn with a mouse", 2, _encoded(drawing.convert("L"), "PNG")),
    ]


def samples_script(items: Sequence[Sample]) -> str:
    """``service/static/samples.js``: the samples as base64 in a global the page reads."""
    entries = [
        {"name": s.name, "type": s.type, "description": s.description, "label": str(s.label),
         "data": base64.b64encode(s.data).decode("ascii")}
        for s in items
    ]  # fmt: skip
    body = json.dumps(entries, indent=2)
    return (
        "// Sample pictures built into the page, for a first click;\n"
        "// written by `python -m export.digits_demo samples`.\n"
        '"use strict";\n'
        f"window.STAGEFORMER_SAMPLES = {body};\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.digits_demo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    done = commands.add_parser("finish", help="judge, export and (with --ship) install a trained checkpoint")
    done.add_argument("checkpoint", type=Path, help="the run's last.safetensors")
    done.add_argument("--out", type=Path, required=True, help="folder for digits.safetensors and digits.onnx")
    done.add_argument("--ship", action="store_true", help=f"also copy both into {DEMO.relative_to(ROOT)}/")
    commands.add_parser("samples", help=f"write {SAMPLES_JS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # the exporter's passes log every step
    started = time.perf_counter()
    if args.command == "finish":
        finish(args.checkpoint, args.out, args.ship)
    else:
        SAMPLES_JS.write_text(samples_script(samples()))
        log.info("wrote %s", SAMPLES_JS)
    log.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
