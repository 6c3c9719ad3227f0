"""A model name export accepts is one the server serves: one rule for both (stageformer.core.naming)."""

from __future__ import annotations

from pathlib import Path

import torch

from model import create_model, default_preprocess, save_checkpoint

from .conftest import png, serve


async def test_a_checkpoint_named_best_with_a_leading_underscore_exports_and_serves(tmp_path: Path) -> None:
    from export import export_onnx

    torch.manual_seed(3)
    checkpoint = save_checkpoint(create_model("tiny"), tmp_path / "_best.safetensors", default_preprocess("tiny"))
    report = export_onnx(checkpoint, tmp_path / "_best.onnx", exporter="torchscript", parity_batch_sizes=(1, 2))
    assert report.name == "_best"
    async with serve(models=[str(tmp_path / "_best.onnx")]) as client:
        assert (await client.get("/v2/models/_best/ready")).json() == {"name": "_best", "ready": True}
        response = await client.post("/v1/models/_best/classify", content=png(), headers={"content-type": "image/png"})
        assert response.status_code == 200 and response.json()["model"] == "_best"
