"""/v1 classify through the whole app (lifespan running): answers, order, batching. Bad input is in
test_bad_input.py, overload and faults in test_faults.py, the API key in test_security.py."""

from __future__ import annotations

import asyncio
import io
import re

import numpy as np
import onnxruntime as ort
from PIL import Image

from stageformer.core.preprocess import PreprocessConfig, preprocess

from .conftest import LABELS, png


def reference_scores(onnx_path, data: bytes) -> np.ndarray:
    """Probabilities from ONNX Runtime directly, on the shared preprocessing."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    config = PreprocessConfig.from_json(session.get_modelmeta().custom_metadata_map["preprocess"])
    pixels = preprocess(Image.open(io.BytesIO(data)), config)[None]
    logits = session.run(None, {"image": pixels})[0][0].astype(np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


async def test_multipart_images_come_back_in_order(client, tiny_onnx) -> None:
    images = [png(seed=i) for i in range(3)]
    files = [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = await client.post("/v1/classify", files=files, params={"top_k": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny"
    assert [r["filename"] for r in body["results"]] == ["img0.png", "img1.png", "img2.png"]
    for data, result in zip(images, body["results"], strict=True):
        predictions = result["predictions"]
        assert len(predictions) == 3
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True)
        expected = reference_scores(tiny_onnx, data)
        best = int(np.argmax(expected))
        assert predictions[0]["index"] == best and predictions[0]["label"] == LABELS[best]
        assert abs(predictions[0]["score"] - expected[best]) < 1e-5


async def test_raw_body_and_named_model_and_normalized_input(client) -> None:
    data = png(seed=5)
    raw = await client.post("/v1/classify", content=data, headers={"content-type": "image/png"})
    named = await client.post("/v1/models/tiny-norm/classify", content=data, headers={"content-type": "image/png"})
    assert raw.status_code == named.status_code == 200
    assert raw.json()["results"][0]["filename"] is None
    assert named.json()["model"] == "tiny-norm"
    a, b = raw.json()["results"][0]["predictions"], named.json()["results"][0]["predictions"]
    assert [p["index"] for p in a] == [p["index"] for p in b]  # the same weights, either input format
    assert all(abs(x["score"] - y["score"]) < 1e-5 for x, y in zip(a, b, strict=True))


async def test_top_k_is_capped_at_the_number_of_classes(client) -> None:
    response = await client.post(
        "/v1/classify", content=png(), headers={"content-type": "image/png"}, params={"top_k": 50}
    )
    assert len(response.json()["results"][0]["predictions"]) == 10


async def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client) -> None:
    images = [png(seed=100 + i) for i in range(48)]
    singles = []
    for data in images[:8]:  # one at a time: batch size 1
        r = await client.post("/v1/classify", content=data, headers={"content-type": "image/png"})
        singles.append(r.json()["results"][0]["predictions"])
    responses = await asyncio.gather(
        *(client.post("/v1/classify", content=d, headers={"content-type": "image/png"}) for d in images)
    )
    assert all(r.status_code == 200 for r in responses)
    for single, response in zip(singles, responses[:8], strict=True):
        together = response.json()["results"][0]["predictions"]
        assert [p["index"] for p in together] == [p["index"] for p in single]
        assert all(abs(x["score"] - y["score"]) < 1e-5 for x, y in zip(together, single, strict=True))
    metrics = (await client.get("/metrics")).text
    total = float(re.search(r'stageformer_batch_size_sum\{model="tiny"\} (\S+)', metrics).group(1))
    calls = float(re.search(r'stageformer_batch_size_count\{model="tiny"\} (\S+)', metrics).group(1))
    assert total / calls > 1.0, "concurrent requests should share inference calls"
    assert 'stageformer_requests_total{method="POST",route="/v1/classify",status="200"}' in metrics
