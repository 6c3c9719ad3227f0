"""int8 against fp32: the calibration folder made from the bench photos, whether the export can quantize, and
the top-1 agreement of the two graphs on the same inputs.

The calibration folder holds the bench photos and pictures derived from them (crops at several scales and
places, mirrored, rotated by a quarter turn), saved as JPEG files, so calibration sees the kind of pixels the
bench sends without anything being downloaded.
"""

from __future__ import annotations

import inspect
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from bench.images import ImageSet

if TYPE_CHECKING:
    from service.runtime import ModelInfo


def unsupported() -> str:
    """Why the int8 rows cannot be made here ("" when they can): ``export_onnx`` must take ``quantize`` and
    ``calibration``."""
    try:
        from export import export_onnx
    except ImportError as exc:
        return f"the export extra is not installed ({exc})"
    wanted = {"quantize", "calibration"}
    missing = wanted - set(inspect.signature(export_onnx).parameters)
    if missing:
        return f"export_onnx has no {', '.join(sorted(missing))} parameter yet (int8 export has not landed)"
    return ""


def derived(image: Image.Image, index: int) -> Image.Image:
    """The ``index``-th picture derived from ``image``: a crop (60-100 % of the short side, at a place set by the
    index), mirrored on odd indices, turned a quarter on every third."""
    rng = np.random.default_rng(index)
    side = int(min(image.size) * rng.uniform(0.6, 1.0))
    left = int(rng.integers(0, image.width - side + 1))
    top = int(rng.integers(0, image.height - side + 1))
    out = image.crop((left, top, left + side, top + side))
    if index % 2:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if index % 3 == 0:
        out = out.transpose(Image.Transpose.ROTATE_90)
    return out


def write_calibration(folder: Path, images: ImageSet, count: int) -> Path:
    """``folder`` filled with ``count`` JPEG files: the photos themselves, then pictures derived from them in
    turn. Written again only when its content would differ."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, bytes] = {}
    for i in range(count):
        name, jpeg = images.names[i % len(images.jpegs)], images.jpegs[i % len(images.jpegs)]
        if i < len(images.jpegs):
            wanted[f"{i:03d}-{name}"] = jpeg
            continue
        with Image.open(io.BytesIO(jpeg)) as opened:
            picture = derived(opened.convert("RGB"), i)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        wanted[f"{i:03d}-{Path(name).stem}-derived.jpg"] = buffer.getvalue()
    for path in folder.iterdir():
        if path.name not in wanted:
            path.unlink()
    for name, data in wanted.items():
        path = folder / name
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
    return folder


def calibration_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"))


def calibration_pixels(folder: Path, info: ModelInfo) -> list[np.ndarray]:
    """The calibration pictures as model input, decoded the exact way."""
    from service.images import prepare

    return [prepare(path.read_bytes(), info.preprocess, 40_000_000) for path in calibration_files(folder)]


def quantization_metadata(path: Path) -> dict[str, Any]:
    """The quantization settings and agreement figures the export wrote into the int8 file ({} if none)."""
    import onnx

    from stageformer.core.formats import QUANTIZATION_KEY

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == QUANTIZATION_KEY:
            found: dict[str, Any] = json.loads(prop.value)
            return found
    return {}


def top1_agreement(fp32: Path, int8: Path, pixels: list[np.ndarray], batch: int = 8) -> dict[str, Any]:
    """The fraction of inputs whose top-1 class is the same in both graphs (ONNX Runtime, CPU), and the largest
    difference of their softmax probabilities."""
    import onnxruntime as ort

    def logits(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        rows = [session.run(None, {name: np.stack(pixels[i : i + batch])})[0] for i in range(0, len(pixels), batch)]
        return np.concatenate(rows).astype(np.float64)

    a, b = logits(fp32), logits(int8)
    same = a.argmax(axis=1) == b.argmax(axis=1)
    return {
        "images": len(pixels),
        "top1_agreement": float(same.mean()),
        "max_abs_softmax_diff": float(np.abs(_softmax(a) - _softmax(b)).max()),
    }


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))
