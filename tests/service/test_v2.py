"""/v2 Open Inference Protocol: metadata, health, JSON and binary tensors, classification. Bad requests
are in test_bad_input.py."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import onnxruntime as ort

from service.bodies import PROCESS_PARSE_BYTES

from .conftest import serve


def pixels(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)


def expected_logits(onnx_path, array: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: array})[0]


async def test_server_and_model_metadata_and_health(client) -> None:
    server = (await client.get("/v2")).json()
    assert server["name"] == "stageformer" and "binary_tensor_data" in server["extensions"]
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).status_code == 200
    meta = (await client.get("/v2/models/tiny")).json()
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["labels"][0] == "class-0"
    norm = (await client.get("/v2/models/tiny-norm/versions/1")).json()
    assert norm["inputs"][0]["datatype"] == "FP32" and norm["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert (await client.get("/v2/models/tiny/ready")).json() == {"name": "tiny", "ready": True}
    assert (await client.get("/v2/models/ghost")).status_code == 404
    assert (await client.get("/v2/models/tiny/versions/2")).status_code == 404


async def test_json_infer_flat_and_nested(client, tiny_onnx) -> None:
    array = pixels()
    expected = expected_logits(tiny_onnx, array)
    for data in (array.ravel().tolist(), array.tolist()):
        body = {
            "id": "req-1",
            "inputs": [{"name": "image", "shape": [2, 32, 32, 3], "datatype": "UINT8", "data": data}],
        }
        response = await client.post("/v2/models/tiny/infer", json=body)
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["id"] == "req-1" and out["model_name"] == "tiny"
        logits = np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(out["outputs"][0]["shape"])
        assert np.allclose(logits, expected, atol=1e-5)


async def test_binary_tensors_in_and_out_and_classification(client, tiny_onnx) -> None:
    array = pixels(3, seed=4)
    header = {
        "inputs": [{"name": "image", "shape": [3, 32, 32, 3], "datatype": "UINT8",
                    "parameters": {"binary_data_size": array.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    head = json.dumps(header).encode()
    response = await client.post(
        "/v2/models/tiny/infer",
        content=head + array.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    n = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:n])
    logits = np.frombuffer(response.content[n:], dtype="<f4").reshape(meta["outputs"][0]["shape"])
    assert np.allclose(logits, expected_logits(tiny_onnx, array), atol=1e-5)

    body = {
        "inputs": [{"name": "image", "shape": [3, 32, 32, 3], "datatype": "UINT8", "data": array.ravel().tolist()}],
        "outputs": [{"name": "logits", "parameters": {"classification": 2}}],
    }
    out = (await client.post("/v2/models/tiny/infer", json=body)).json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [3, 2]
    score, index, label = out["data"][0].split(":")
    assert int(index) == int(np.argmax(logits[0])) and label == f"class-{index}" and 0 < float(score) <= 1


async def test_a_large_json_body_is_parsed_in_a_worker_process_with_the_same_answers(tiny_onnx) -> None:
    array = pixels(128, seed=3)
    request = {"id": "big", "inputs": [{"name": "image", "shape": [128, 32, 32, 3], "datatype": "UINT8"}]}
    request["inputs"][0]["data"] = array.tolist()
    body = json.dumps(request).encode()
    assert len(body) > PROCESS_PARSE_BYTES
    headers = {"content-type": "application/json"}
    async with serve(models=[str(tiny_onnx)], max_images=128, max_batch_size=8) as client:
        response = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["id"] == "big"
        logits = np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(out["outputs"][0]["shape"])
        np.testing.assert_allclose(logits, expected_logits(tiny_onnx, array), atol=1e-5)
        parser = client.app.state.stageformer.json_parser
        assert parser._pool is not None, "the body did not go to the worker process"

        request["inputs"][0]["shape"] = [128, 32, 32, 4]  # an error found there comes back whole
        bad = await client.post("/v2/models/tiny/infer", content=json.dumps(request).encode(), headers=headers)
        assert bad.status_code == 400 and "does not fit the model" in bad.json()["error"], bad.text

        for pid in list(parser._pool._processes):  # the worker dies: only the request it holds fails
            os.kill(pid, signal.SIGKILL)
        died = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert died.status_code == 500 and "died" in died.json()["error"], died.text
        again = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert again.status_code == 200, again.text
