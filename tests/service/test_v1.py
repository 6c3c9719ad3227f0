"""/v1 classify through the whole app (lifespan running): answers, batching, isolation, errors."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import zlib

import numpy as np
import onnxruntime as ort
from PIL import Image

from service.preprocess import PreprocessConfig, preprocess

from .conftest import LABELS, png, serve


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


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


async def test_bad_input_gets_the_documented_status_and_a_json_error(tiny_onnx) -> None:
    async with serve(models=[str(tiny_onnx)], max_images=3, max_body_bytes=200_000, max_image_pixels=1_000_000) as c:
        good = png()
        cases = [
            ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "is empty"),
            ({"content": b"just text", "headers": {"content-type": "image/jpeg"}}, 415, "not an image"),
            ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported Content-Type"),
            (
                {"content": good[: len(good) // 2], "headers": {"content-type": "image/png"}},
                400,
                "truncated or corrupt",
            ),
            ({"content": _png_header_only(30000, 30000), "headers": {"content-type": "image/png"}}, 413, "pixels"),
            ({"content": b"x" * 300_000, "headers": {"content-type": "image/png"}}, 413, "limit is 200,000"),
            ({"files": [("file", ("a.png", good, "image/png"))] * 4}, 413, "at most 3 images"),
            ({"files": [("image", ("a.png", good, "image/png"))]}, 400, "no part named 'file'"),
            ({"data": {"file": "not a file"}, "files": [("other", ("a", b"x", "text/plain"))]}, 400, "file upload"),
        ]
        for kwargs, status, message in cases:
            response = await c.post("/v1/classify", **kwargs)
            assert response.status_code == status, (kwargs.keys(), response.text)
            assert message in response.json()["error"], response.json()
            assert "Traceback" not in response.text
        assert (await c.post("/v1/models/nope/classify", content=good)).status_code == 404
        bad_k = await c.post("/v1/classify", content=good, headers={"content-type": "image/png"}, params={"top_k": 0})
        assert bad_k.status_code == 422 and "top_k" in bad_k.json()["error"]
        assert (await c.get("/v1/nothing")).json()["error"].startswith("no route GET /v1/nothing")
        # the server kept serving through all of that
        ok = await c.post("/v1/classify", content=good, headers={"content-type": "image/png"})
        assert ok.status_code == 200


async def test_image_modes_and_formats(client) -> None:
    for mode, fmt in [("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("CMYK", "JPEG"), ("RGB", "WEBP"), ("RGB", "BMP"),
                      ("RGB", "TIFF")]:  # fmt: skip
        buffer = io.BytesIO()
        Image.new(mode, (23, 17)).save(buffer, format=fmt)
        response = await client.post(
            "/v1/classify", files=[("file", (f"x.{fmt.lower()}", buffer.getvalue(), "image/x"))]
        )
        assert response.status_code == 200, (mode, fmt, response.text)


async def test_api_key_guards_inference_and_metadata_not_health(tiny_onnx) -> None:
    async with serve(models=[str(tiny_onnx)], api_key="s3cret") as c:
        data = png()
        missing = await c.post("/v1/classify", content=data, headers={"content-type": "image/png"})
        wrong = await c.post(
            "/v1/classify", content=data, headers={"content-type": "image/png", "authorization": "Bearer nope"}
        )
        assert missing.status_code == wrong.status_code == 401
        assert "API key" in missing.json()["error"]
        right = await c.post(
            "/v1/classify", content=data, headers={"content-type": "image/png", "authorization": "Bearer s3cret"}
        )
        assert right.status_code == 200
        assert (await c.get("/v2/models/tiny")).status_code == 401
        assert (await c.get("/v2")).status_code == 401
        assert (await c.get("/v2/health/ready")).status_code == 200
        assert (await c.get("/v2/health/live")).status_code == 200


async def test_overload_inference_failure_and_timeout(tiny_onnx) -> None:
    async with serve(models=[str(tiny_onnx)], max_queue_size=2, max_batch_size=1, request_timeout_s=4.0) as c:
        batcher = c.app.state.stageformer.registry.models["tiny"].batcher
        real_run = batcher._run
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stuck(batch, instance):
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(30)
            return real_run(batch, instance)

        batcher._run = stuck
        headers = {"content-type": "image/png"}
        # the model is stuck: one request runs, two wait (the queue limit), the rest are refused at once
        responses = await asyncio.gather(
            *(c.post("/v1/classify", content=png(seed=i), headers=headers) for i in range(6))
        )
        statuses = [r.status_code for r in responses]
        assert statuses.count(503) >= 3 and set(statuses) <= {503, 504}, statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["retry-after"] == "1" and "overloaded" in rejected.json()["error"]
        assert 504 in statuses  # the queued ones waited past their timeout and were not run
        gate.set()
        await asyncio.sleep(0.2)  # the stuck call finishes

        def broken(batch, instance):
            raise RuntimeError("injected")

        batcher._run = broken
        failed = await c.post("/v1/classify", content=png(), headers=headers)
        assert failed.status_code == 500 and "inference failed" in failed.json()["error"]
        batcher._run = real_run
        assert (await c.post("/v1/classify", content=png(), headers=headers)).status_code == 200
        metrics = (await c.get("/metrics")).text
        assert 'stageformer_rejections_total{model="tiny",reason="queue_full"}' in metrics
