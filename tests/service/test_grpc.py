"""The Open Inference Protocol over gRPC, end to end with ``tritonclient.grpc`` against live servers: health,
metadata, config, inference (exact against in-process ONNX Runtime), batching of concurrent calls, the
classification extension, every error code, the API key, and the drain on SIGTERM."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from stageformer.local import free_port

from .harness import GatedRun, LiveServer, live_server, metric, request, server_process, slow_model, wait_until

KEY = {"authorization": "Bearer s3cret"}
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"  # the route label of its metrics


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def infer_input(batch: np.ndarray, name: str = "image", datatype: str = "UINT8") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return tensor


@pytest.fixture(scope="module")
def live(tiny_onnx: Path, norm_onnx: Path) -> Iterator[LiveServer]:
    with live_server(models=[str(tiny_onnx), str(norm_onnx)], grpc_port=free_port(), max_batch_size=8,
                     max_queue_delay_ms=20) as server:  # fmt: skip
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(f"127.0.0.1:{live.state.settings.grpc_port}") as c:
        yield c


def test_health_metadata_and_config(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and not client.is_model_ready("nope")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "stageformer" and "model_repository" in server["extensions"]
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": ["-1", "32", "32", "3"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = client.get_model_config("tiny", as_json=True)["config"]
    assert config["max_batch_size"] == 8 and config["input"][0]["data_type"] == "TYPE_UINT8"
    assert config["input"][0]["dims"] == ["32", "32", "3"] and config["output"][0]["dims"] == ["10"]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "20000"


def test_inference_matches_onnx_runtime_raw_and_typed(
    client: grpcclient.InferenceServerClient, live: LiveServer, tiny_onnx: Path, norm_onnx: Path
) -> None:
    batch = pixels(5)
    expected = ort.InferenceSession(str(tiny_onnx)).run(None, {"image": batch})[0]
    result = client.infer("tiny", [infer_input(batch)], request_id="r1")
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    assert result.get_response().id == "r1"
    floats = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = ort.InferenceSession(str(norm_onnx)).run(None, {"image": floats})[0]
    typed = pb.ModelInferRequest(model_name="tiny-norm")  # typed contents: what tritonclient never sends
    typed.inputs.add(name="image", datatype="FP32", shape=floats.shape).contents.fp32_contents[:] = floats.ravel()
    with grpc.insecure_channel(f"127.0.0.1:{live.state.settings.grpc_port}") as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed)
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_classification_extension(client: grpcclient.InferenceServerClient, tiny_onnx: Path) -> None:
    batch = pixels(2, seed=3)
    logits = ort.InferenceSession(str(tiny_onnx)).run(None, {"image": batch})[0]
    output = grpcclient.InferRequestedOutput("logits", class_count=3)
    top = client.infer("tiny", [infer_input(batch)], outputs=[output]).as_numpy("logits")
    assert top.shape == (2, 3)
    for row, scores in zip(top, logits, strict=True):
        indices = [int(entry.decode().split(":")[1]) for entry in row]
        assert indices == list(np.argsort(-scores, kind="stable")[:3])
        assert row[0].decode().endswith(f":class-{indices[0]}")


def test_concurrent_calls_are_batched_together(live: LiveServer) -> None:
    def totals() -> tuple[float, float]:
        text = request(live.port, "GET", "/metrics").body.decode()
        return tuple(metric(text, f"stageformer_batch_size_{part}", model="tiny") for part in ("sum", "count"))  # type: ignore[return-value]

    def one(i: int) -> np.ndarray:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{live.state.settings.grpc_port}") as c:
            return c.infer("tiny", [infer_input(pixels(1, seed=i))]).as_numpy("logits")

    images_before, runs_before = totals()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert all(r.shape == (1, 10) for r in results)
    images_after, runs_after = totals()
    images, runs = images_after - images_before, runs_after - runs_before
    assert images == 64 and images / runs > 1, (images, runs)  # the mean batch


def test_bad_requests_get_clear_status_codes(client: grpcclient.InferenceServerClient, live: LiveServer) -> None:
    cases = [
        (lambda: client.infer("nope", [infer_input(pixels(1))]), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
        (
            lambda: client.infer("tiny", [infer_input(pixels(1), name="pixels")]),
            "StatusCode.INVALID_ARGUMENT",
            "unknown input 'pixels'",
        ),
        (
            lambda: client.infer("tiny", [infer_input(pixels(1).astype(np.float32), datatype="FP32")]),
            "StatusCode.INVALID_ARGUMENT",
            "this model takes UINT8",
        ),
        (
            lambda: client.infer("tiny", [infer_input(np.zeros((1, 16, 16, 3), np.uint8))]),
            "StatusCode.INVALID_ARGUMENT",
            "does not fit the model",
        ),
        (
            lambda: client.infer("tiny", [infer_input(pixels(1))], model_version="2"),
            "StatusCode.NOT_FOUND",
            "version 1",
        ),
        (lambda: client.get_model_metadata("nope"), "StatusCode.NOT_FOUND", "unknown model"),
    ]
    for call, status, message in cases:
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == status and message in refused.value.message(), refused.value


def test_full_queue_is_unavailable_and_a_timeout_is_deadline_exceeded(tiny_onnx: Path) -> None:
    settings = {"grpc_port": free_port(), "max_batch_size": 1, "max_queue_size": 2, "max_images": 2,
                "request_timeout_s": 1.0, "max_queue_delay_ms": 0}  # fmt: skip
    with live_server(models=[str(tiny_onnx)], **settings) as live:
        gated = GatedRun.stuck(live.model("tiny").batcher)
        address = f"127.0.0.1:{settings['grpc_port']}"

        def one(i: int) -> str:
            with grpcclient.InferenceServerClient(address) as c:
                try:
                    c.infer("tiny", [infer_input(pixels(1, seed=i))])
                except InferenceServerException as exc:
                    return f"{exc.status()}"
                return "OK"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(8)))
        gated.gate.set()
        assert set(outcomes) == {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}, outcomes
        text = request(live.port, "GET", "/metrics").body.decode()
        assert metric(text, "stageformer_requests_total", route=MODEL_INFER,
                      status="UNAVAILABLE") >= 1  # fmt: skip


def test_the_api_key_guards_grpc_too(tiny_onnx: Path) -> None:
    port = free_port()
    with live_server(models=[str(tiny_onnx)], grpc_port=port, api_key="s3cret"), \
            grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as c:  # fmt: skip
        assert c.is_server_live()  # health is open, as over HTTP
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            with pytest.raises(InferenceServerException) as refused:
                c.infer("tiny", [infer_input(pixels(1))], headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException):
                c.get_model_metadata("tiny", headers=headers)
        assert c.infer("tiny", [infer_input(pixels(1))], headers=KEY).as_numpy("logits").shape == (1, 10)
        assert c.get_model_repository_index(headers=KEY)


def test_sigterm_drains_grpc_calls_in_flight(tmp_path: Path) -> None:
    slow = slow_model(tmp_path / "slow.onnx", steps=1200)  # slow enough that the eight calls are queued together
    grpc_port = free_port()
    args = (str(slow), "--max-batch-size", "1", "--max-queue-delay-ms", "0", "--grpc-port", str(grpc_port))
    with server_process(*args) as (port, process):
        address = f"127.0.0.1:{grpc_port}"

        def one(i: int) -> str:
            with grpcclient.InferenceServerClient(address) as c:
                return str(c.infer("slow", [infer_input(pixels(1, seed=i))]).as_numpy("logits").shape)

        with ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(one, i) for i in range(8)]

            def all_admitted() -> bool:  # one in the model, the others queued or answered
                text = request(port, "GET", "/metrics").body.decode()
                queued = metric(text, "stageformer_queue_depth", model="slow")
                done = metric(text, "stageformer_requests_total", route=MODEL_INFER, method="GRPC", status="OK")
                return queued >= 1 and queued + done >= 7

            wait_until(all_admitted, 30, "all eight calls to be admitted")
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with grpcclient.InferenceServerClient(address) as late, pytest.raises(InferenceServerException) as refused:
                late.infer("slow", [infer_input(pixels(1))])
            assert refused.value.status() == "StatusCode.UNAVAILABLE" and "shutting down" in refused.value.message()
            assert [c.result() for c in calls] == ["(1, 10)"] * 8
        assert process.wait(30) == 0
