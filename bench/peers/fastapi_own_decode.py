"""The endpoint a competent engineer writes in twenty lines: FastAPI, a plain ``def`` route (FastAPI runs it in
its thread pool), one ``session.run`` per request, and the usual Pillow preprocessing written out by hand:
``draft()`` so that libjpeg decodes a large JPEG at a reduced scale (never below the resize target),
``convert("RGB")``, resize of the short side and a centre crop. The model's own sizes and resampling filter
come from the ONNX file's metadata, so the model sees what it was trained on; mean and std are applied
inside the exported graph (``uint8`` input). Nothing of the server is used.

Run: ``python -m bench.peers.fastapi_own_decode MODEL.onnx --port 8003``; ``POST /predict`` with a
multipart ``file`` part; ``GET /health``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from stageformer.core.formats import LABELS_KEY, PREPROCESS_KEY


def pixel_loader(preprocess: dict[str, Any]) -> Callable[[bytes], np.ndarray]:
    """JPEG (or any Pillow format) bytes -> ``uint8 [size, size, 3]``, the way the model was trained to see it."""
    size = int(preprocess["image_size"])
    short = math.floor(size / float(preprocess.get("crop_pct", 1.0)))
    resample = Image.Resampling[str(preprocess.get("interpolation", "bicubic")).upper()]

    def load(data: bytes) -> np.ndarray:
        opened = Image.open(io.BytesIO(data))
        opened.draft("RGB", (short, short))  # JPEG: decode at 1/2, 1/4 or 1/8 scale while both sides stay >= short
        image = opened.convert("RGB")
        scale = short / min(image.size)
        width, height = max(short, round(image.width * scale)), max(short, round(image.height * scale))
        image = image.resize((width, height), resample)
        left, top = (width - size) // 2, (height - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)))

    return load


def create_app(model_path: str) -> FastAPI:
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = ort.InferenceSession(model_path, providers=providers)
    meta = session.get_modelmeta().custom_metadata_map
    labels = json.loads(meta[LABELS_KEY])
    input_name = session.get_inputs()[0].name
    if session.get_inputs()[0].type != "tensor(uint8)":
        raise SystemExit(f"{model_path}: this endpoint sends uint8 pixels; export the model with --input raw")
    load_pixels = pixel_loader(json.loads(meta[PREPROCESS_KEY]))
    app = FastAPI(title="plain FastAPI endpoint, own decoding")

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 (FastAPI's documented style)
        pixels = load_pixels(file.file.read())
        logits = session.run(None, {input_name: pixels[None]})[0][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = np.argsort(-probs)[:5]
        predictions = [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in best]
        return {"filename": file.filename, "predictions": predictions}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
