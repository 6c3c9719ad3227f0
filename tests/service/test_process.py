"""The server as users run it: a real process, a real port, tritonclient, SIGTERM, and no torch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.settings import Settings
from stageformer.core.cuda import cuda_provider_works
from stageformer.local import free_port

from .harness import ROOT, server_process


def classify(port: int, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/classify", data=data, headers={"content-type": "image/png"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serving_imports_no_torch(tiny_onnx: Path) -> None:
    script = f"""
import asyncio, sys, httpx
from service import create_app
from service.settings import Settings
from stageformer.core.cuda import cuda_provider_works

async def main():
    app = create_app(Settings(models=[{str(tiny_onnx)!r}]))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/classify", content=open({str(ROOT / "pyproject.toml")!r}, "rb").read(),
                             headers={{"content-type": "image/png"}})
            assert r.status_code == 415, r.text
            r = await c.get("/v2/models/tiny")
            assert r.status_code == 200, r.text
    print("torch" in sys.modules)

asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_tritonclient_round_trip_on_a_live_server(tiny_onnx: Path) -> None:
    tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")
    array = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": array})[0]
    with server_process(str(tiny_onnx)) as (port, _):
        client = tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        metadata = client.get_model_metadata("tiny")
        assert metadata["inputs"][0]["shape"] == [-1, 32, 32, 3]
        for binary in (True, False):
            tensor = tritonclient_http.InferInput("image", list(array.shape), "UINT8")
            tensor.set_data_from_numpy(array, binary_data=binary)
            outputs = [tritonclient_http.InferRequestedOutput("logits", binary_data=binary)]
            result = client.infer("tiny", [tensor], outputs=outputs)
            assert np.allclose(result.as_numpy("logits"), expected, atol=1e-5)
        classes = [tritonclient_http.InferRequestedOutput("logits", binary_data=True, class_count=3)]
        tensor = tritonclient_http.InferInput("image", list(array.shape), "UINT8")
        tensor.set_data_from_numpy(array)
        top = client.infer("tiny", [tensor], outputs=classes).as_numpy("logits")
        assert top.shape == (2, 3)
        assert int(top[0, 0].decode().split(":")[1]) == int(np.argmax(expected[0]))


def test_invalid_settings_fail_at_start_up_with_a_clear_message(tiny_onnx: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stageformer", "serve", str(tiny_onnx), "--max-batch-size", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "max_batch_size must be auto or an integer from 1 to 1024, got 0" in result.stderr
    if cuda_provider_works():
        return  # on a GPU machine --device cuda is valid; the refusal is what is tested elsewhere
    result = subprocess.run(
        [sys.executable, "-m", "stageformer", "serve", str(tiny_onnx), "--device", "cuda", "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "--device cuda was asked for" in result.stderr


def test_a_model_that_cannot_load_stops_serve_with_one_line_before_it_listens(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 100)
    bare = tmp_path / "bare.onnx"  # a valid ONNX file that `stageformer export` did not write: no metadata
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["logits"])], "bare",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["b", 10])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", 10])]))  # fmt: skip
    onnx.save(model, str(bare))
    port = free_port()
    for path, message in (
        ("missing.onnx", "model path 'missing.onnx' does not exist"),
        (str(corrupt), "ONNX Runtime cannot load it"),
        (str(bare), "metadata 'preprocess' is missing; export the model with `stageformer export`"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "stageformer", "serve", path, "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stageformer serve: cannot serve: "), result.stderr
        assert message in lines[0]
        assert "Uvicorn running" not in result.stdout + result.stderr  # it never listened


def test_every_setting_is_a_flag_with_its_description_and_choices() -> None:
    from service.cli import add_arguments, settings_from_args
    from stageformer.cli import build_parser

    serve = argparse.ArgumentParser()
    add_arguments(serve)
    flags = {a.dest: a for a in serve._actions}
    for name, field in Settings.model_fields.items():
        assert name in flags, f"setting {name} has no flag"
        assert field.description and field.description in (flags[name].help or "") % {}, name  # as argparse shows it
        assert f"STAGEFORMER_{name.upper()}" in (flags[name].help or "") or name == "models", name
    assert flags["device"].choices == ["auto", "cpu", "cuda", "tensorrt"]
    assert flags["log_level"].choices == ["debug", "info", "warning", "error"]
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--device", "tpu"])
    args = parser.parse_args(["serve", "a.onnx", "b", "--max-queue-delay-ms", "0.5", "--cors-origins", "x", "y"])
    settings = settings_from_args(args)
    assert settings.models == ["a.onnx", "b"] and settings.max_queue_delay_ms == 0.5
    assert settings.cors_origins == ["x", "y"]


def test_log_level_before_the_subcommand_reaches_serve_and_serve_s_own_flag_wins() -> None:
    from service.cli import settings_from_args
    from stageformer.cli import build_parser

    parser = build_parser()
    assert settings_from_args(parser.parse_args(["--log-level", "debug", "serve"])).log_level == "debug"
    both = parser.parse_args(["--log-level", "debug", "serve", "--log-level", "warning"])
    assert settings_from_args(both).log_level == "warning"
    assert settings_from_args(parser.parse_args(["serve"])).log_level == "info"
    assert settings_from_args(parser.parse_args(["serve", "--drain-timeout-s", "3"])).drain_timeout_s == 3.0


def test_serve_puts_what_start_up_made_out_of_the_cyclic_collector_s_sight(tiny_onnx: Path) -> None:
    """Full collections under load would otherwise walk every module, model and route object each time (~50 ms
    holding the GIL on the CIFAR model at 16 clients); ``serve`` freezes them once the app is built."""
    script = """
import gc, sys
import service.server

class Recorder:  # stands in for uvicorn: records what the collector sees when serving would begin
    started = True
    def __init__(self, config, state): pass
    def run(self): print("frozen", gc.get_freeze_count(), flush=True)

service.server.draining_server = Recorder
from stageformer.cli import main
sys.exit(main(["serve", sys.argv[1], "--port", "0", "--grpc-port", "0", "--lanes", "0", "--max-batch-size", "1"]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_onnx)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words[0] == "frozen" and int(words[1]) > 10_000, result.stdout  # the modules, app and model objects
