"""The plain FastAPI way: an ``UploadFile`` endpoint written as a plain ``def``, so FastAPI runs it
in its default thread pool; each request decodes its image and makes its own ``session.run`` call
with a batch of one. No batching, no queue limit: what a first version of a model server looks like.

Run: ``python -m bench.peers.plain_fastapi MODEL.onnx --port 8001``; ``POST /predict`` with a
multipart ``file`` part; ``GET /health``.
"""

from __future__ import annotations

import argparse
from typing import Any

from fastapi import FastAPI, File, UploadFile

from bench.peers.common import PeerModel


def create_app(model_path: str) -> FastAPI:
    app = FastAPI(title="plain FastAPI peer")
    model = PeerModel.load(model_path)

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 (FastAPI's documented style)
        pixels = model.pixels(file.file.read())
        logits = model.run(pixels[None])[0]
        return {"filename": file.filename, "predictions": model.top_k(logits)}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
