"""Tools for the reliability tests: a deliberately slow ONNX model, a real uvicorn server in a thread
(real sockets, but the app in this process so a test can reach its batcher), a subprocess server,
and small blocking HTTP helpers."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.batcher import Batcher
from service.pipeline import ModelPipeline
from service.server import uvicorn_config
from service.settings import Settings
from service.state import AppState
from stageformer.local import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[2]


def slow_model(path: Path, steps: int = 400, width: int = 1024) -> Path:
    """An ONNX classifier of 32x32 uint8 images that is slow on purpose: ``steps`` chained
    1024x1024 MatMul + Tanh layers (about 40 ms a call at batch 1 on a 2-core CPU). Its metadata is
    what ``stageformer export`` writes, so the server loads it like any exported model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        numpy_helper.from_array((rng.standard_normal((3, width)) / 50).astype(np.float32), "w_in"),
        numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((width, 10)).astype(np.float32), "w_out"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),  # [B, 3]: the image's mean colour
        helper.make_node("MatMul", ["mean", "w_in"], ["h0"]),
    ]
    for i in range(steps):
        nodes += [
            helper.make_node("MatMul", [f"h{i}", "w"], [f"a{i}"]),
            helper.make_node("Tanh", [f"a{i}"], [f"h{i + 1}"]),
        ]
    nodes.append(helper.make_node("MatMul", [f"h{steps}", "w_out"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 32, 32, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    preprocess = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bilinear"}
    for key, value in {"name": "slow", "labels": json.dumps([str(i) for i in range(10)]),
                       "preprocess": json.dumps(preprocess)}.items():  # fmt: skip
        model.metadata_props.add(key=key, value=value)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# --- an in-process server on a real socket ----------------------------------------------------------


@dataclass
class LiveServer:
    server: uvicorn.Server
    port: int
    app: FastAPI
    state: AppState

    def model(self, name: str) -> ModelPipeline:
        assert self.state.registry is not None
        return self.state.registry.models[name]


@contextmanager
def live_server(**settings: Any) -> Iterator[LiveServer]:
    """uvicorn serving ``create_app(Settings(**settings))`` on a free loopback port, in a thread; ``lanes`` 0
    unless given (see ``server_process``)."""
    settings_ = Settings(**{"grpc_port": 0, "lanes": 0, **settings})
    app = create_app(settings_)
    config = uvicorn_config(app, settings_, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(server, port, app, app.state.stageformer)
    finally:
        server.should_exit = True
        thread.join(30)


class GatedRun:
    """Wraps a batcher's ``run``: blocks while the gate is closed, records each batch's first pixels,
    and fails any batch holding an image whose first pixel is ``poison``."""

    def __init__(self, run: Callable[[np.ndarray, int], np.ndarray], poison: int | None = None) -> None:
        self.run = run
        self.poison = poison
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[int]] = []

    @classmethod
    def stuck(cls, batcher: Batcher, poison: int | None = None) -> GatedRun:
        """Wrap ``batcher``'s run with the gate closed: nothing leaves its queue until ``gate.set()``."""
        gated = cls(batcher._run, poison)
        batcher._run = gated
        gated.gate.clear()
        return gated

    def __call__(self, batch: np.ndarray, instance: int) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(60), "the gate stayed closed"
        markers = [int(x) for x in batch[:, 0, 0, 0]]
        self.batches.append(markers)
        if self.poison is not None and self.poison in markers:
            raise RuntimeError("injected inference failure")
        return self.run(batch, instance)

    @property
    def seen(self) -> list[int]:
        return [m for batch in self.batches for m in batch]


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# --- blocking HTTP ------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    connection: http.client.HTTPConnection | None = None,
) -> Reply:
    """One request on a new connection (or on ``connection``, kept open)."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    started = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data,
                     time.perf_counter() - started)  # fmt: skip
    finally:
        if connection is None:
            conn.close()


def classify(port: int, image: bytes, **kwargs: Any) -> Reply:
    return request(port, "POST", "/v1/classify", image, {"content-type": "image/png"}, **kwargs)


def raw_request(port: int, image: bytes, path: str = "/v1/classify") -> socket.socket:
    """A whole classify request written to a new socket, the answer left unread (to disconnect)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: {len(image)}\r\n\r\n"
    sock.sendall(head.encode() + image)
    return sock


def marked_png(marker: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """A flat PNG whose pixels are all ``marker``: after preprocessing, ``batch[i, 0, 0, 0] == marker``."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (marker, marker, marker)).save(buffer, format="PNG")
    return buffer.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- a server process, as users run it -------------------------------------------------------------------


@contextmanager
def server_process(*args: str, **env: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``stageformer serve ARGS`` on a free port, ready; killed at the end if still running. Without ``--lanes``
    in ARGS: ``--lanes 0`` (one inference thread per model, what these tests of batching, admission and
    draining count on; the lanes have their own tests)."""
    port = free_port()
    grpc = [] if "--grpc-port" in args else ["--grpc-port", "0"]
    lanes = [] if any(a.startswith("--lanes") for a in args) else ["--lanes", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "stageformer", "serve", *args, "--port", str(port), *grpc, *lanes],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def died() -> str | None:
        if process.poll() is None:
            return None
        assert process.stderr is not None
        return f"server exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}"

    try:
        wait_until_ready(port, died=died, timeout_s=60)
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
