"""ONNX models for the server tests, exported once per session from fresh ``tiny`` checkpoints, and
an app with its lifespan running behind an httpx client."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model import create_model, default_preprocess, save_checkpoint
from service.app import create_app
from service.settings import Settings

LABELS = [f"class-{i}" for i in range(10)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.onnx (uint8 input) and tiny-norm.onnx (float input), exported by stageformer itself."""
    from export import export_onnx

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(1)
    checkpoint = save_checkpoint(create_model("tiny"), folder / "tiny.safetensors", default_preprocess("tiny"), LABELS)
    export_onnx(checkpoint, folder / "onnx" / "tiny.onnx", name="tiny")
    export_onnx(checkpoint, folder / "norm" / "tiny-norm.onnx", input="normalized", name="tiny-norm")
    return folder


@pytest.fixture(scope="session")
def tiny_onnx(model_dir: Path) -> Path:
    return model_dir / "onnx" / "tiny.onnx"


@pytest.fixture(scope="session")
def norm_onnx(model_dir: Path) -> Path:
    return model_dir / "norm" / "tiny-norm.onnx"


def png(size: tuple[int, int] = (40, 30), seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@asynccontextmanager
async def serve(**settings: object) -> AsyncIterator[httpx.AsyncClient]:
    """An app with its lifespan running, and a client talking to it in-process; ``lanes`` 0 unless given (as
    ``harness.server_process``)."""
    app = create_app(Settings(**{"grpc_port": 0, "lanes": 0, **settings}))  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture
async def client(tiny_onnx: Path, norm_onnx: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(models=[str(tiny_onnx), str(norm_onnx)], max_batch_size=8, max_queue_delay_ms=5) as c:
        yield c
