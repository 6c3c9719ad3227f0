"""The systems under load, each a server process on a loopback port, and the requests each one gets.

- ``stageformer /v1``: ``stageformer serve MODEL.onnx``, JPEG files as multipart ``file`` parts;
- ``stageformer /v2``: the same process, Open Inference Protocol with binary tensors (pixels decoded
  and preprocessed by the client beforehand, as a KServe/Triton client would send them);
- ``stageformer gRPC``: the same process and the same tensors through gRPC ``ModelInfer`` with raw contents, on
  the server's ``--grpc-port`` (a free port; servers whose systems do not use gRPC start with ``--grpc-port 0``);
- ``plain FastAPI (own decode)``, ``plain FastAPI`` and ``LitServe``: the peers in ``bench.peers``, the same
  JPEG files as ``/v1``.

Other systems (the threads study, int8) are the same server with other flags or another model file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.grpc_load import GrpcRequest, run_grpc_level
from bench.images import ImageSet
from bench.loadgen import Hook, LevelResult, LoadPlan, Request, get, multipart_request, run_level
from stageformer.local import NotReadyError, wait_until_ready

if TYPE_CHECKING:
    import numpy as np

    from service.runtime import ModelInfo

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent

OURS_V1 = "stageformer /v1"
OURS_V2 = "stageformer /v2"
OURS_GRPC = "stageformer gRPC"
PLAIN_OWN = "plain FastAPI (own decode)"
PLAIN = "plain FastAPI"
LITSERVE = "LitServe"
SYSTEMS = (OURS_V1, OURS_V2, OURS_GRPC, PLAIN_OWN, PLAIN, LITSERVE)

UNBATCHED = ("plain", "plain-own")  # server kinds that run one request per inference call


@dataclass(frozen=True)
class System:
    """One way of serving a workload that the load generator measures: which server process (``server``,
    with ``serve_args`` and, where it is not the workload's own file, ``model``) and which route
    (``v1``: multipart JPEG, ``v2``: binary tensors, ``grpc``: the same tensors through gRPC ModelInfer,
    ``predict``: a peer's multipart JPEG route).
    Systems with the same ``process`` share one server process."""

    name: str
    server: str  # "stageformer", "plain", "plain-own" or "litserve"
    route: str  # "v1", "v2", "grpc" or "predict"
    serve_args: tuple[str, ...] = ()
    model: Path | None = None

    @property
    def process(self) -> tuple[str, tuple[str, ...], str]:
        return (self.server, self.serve_args, str(self.model or ""))

    @property
    def batches(self) -> bool:
        """Whether the server batches requests (else every inference call has one image)."""
        return self.server not in UNBATCHED


STANDARD = {
    OURS_V1: System(OURS_V1, "stageformer", "v1"),
    OURS_V2: System(OURS_V2, "stageformer", "v2"),
    OURS_GRPC: System(OURS_GRPC, "stageformer", "grpc"),
    PLAIN_OWN: System(PLAIN_OWN, "plain-own", "predict"),
    PLAIN: System(PLAIN, "plain", "predict"),
    LITSERVE: System(LITSERVE, "litserve", "predict"),
}
SERVERS = {name: system.server for name, system in STANDARD.items()}


class ServerError(RuntimeError):
    """A server process did not start or died; the message carries the end of its log."""


def litserve_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("litserve") is not None


@dataclass
class ServerProcess:
    """One server in its own process group, started and stopped by the benchmark."""

    name: str
    argv: list[str]
    port: int
    health_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180.0) -> float:
        """Start it and wait until its health route answers 200; returns the seconds it took."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,  # its own process group: stop() ends the workers it spawns too
            )
        process = self.process

        def died() -> str | None:
            code = process.poll()
            return None if code is None else f"it exited with status {code}"

        try:
            wait_until_ready(self.port, died=died, timeout_s=timeout_s, path=self.health_path, host=HOST,
                             interval_s=0.25)  # fmt: skip
        except NotReadyError as exc:
            self.stop()
            raise ServerError(f"{self.name} was not ready: {exc}\n{self.log_tail()}") from None
        return time.perf_counter() - started

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to its process group, SIGKILL after ``timeout_s``."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # workers a peer spawned may outlive its main process
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None

    @property
    def pid(self) -> int:
        """The process (and process group) id; 0 when not running."""
        return self.process.pid if self.process is not None else 0

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_command(
    server: str, model: Path, port: int, serve_args: list[str], batch_log: Path, grpc_port: int = 0
) -> tuple[list[str], str]:
    """(argv, health path) of one server kind. Our server listens for gRPC on ``grpc_port`` (0: not at all), which
    comes after ``serve_args`` so that the bench knows where."""
    python = sys.executable
    if server == "stageformer":
        argv = [python, "-m", "stageformer", "serve", str(model), "--host", HOST, "--port", str(port)]
        return [*argv, "--log-level", "warning", *serve_args, "--grpc-port", str(grpc_port)], "/v2/health/ready"
    if server in ("plain", "plain-own"):
        module = {"plain": "bench.peers.plain_fastapi", "plain-own": "bench.peers.fastapi_own_decode"}[server]
        return [python, "-m", module, str(model), "--host", HOST, "--port", str(port)], "/health"
    if server == "litserve":
        argv = [python, "-m", "bench.peers.litserve_peer", str(model), "--host", HOST, "--port", str(port)]
        return [*argv, "--batch-log", str(batch_log)], "/health"
    raise ValueError(f"unknown server {server!r}")


# --- requests -----------------------------------------------------------------------------------


def v2_request(port: int, model: str, pixels: np.ndarray) -> Request:
    """A binary-tensor Open Inference Protocol request for one image (``[H, W, 3]``) or a batch of them
    (``[N, H, W, 3]``), asking for the top 5 classes."""
    shape = list(pixels.shape) if pixels.ndim == 4 else [1, *pixels.shape]
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": shape,
                "datatype": "UINT8",
                "parameters": {"binary_data_size": pixels.nbytes},
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"classification": 5}}],
    }
    head = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return Request.build("POST", f"/v2/models/{model}/infer", HOST, port, head + pixels.tobytes(), headers)


def model_inputs(onnx_path: Path, images: ImageSet) -> tuple[ModelInfo, list[np.ndarray]]:
    """The model's metadata as the server reads it, and the images decoded and preprocessed for it
    (what a ``/v2`` client sends)."""
    import onnxruntime as ort

    from service.images import prepare
    from service.runtime import read_model_info

    info = read_model_info(onnx_path, ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]))
    return info, [prepare(j, info.preprocess, 40_000_000) for j in images.jpegs]


def requests_for(system: System, port: int, model: str, images: ImageSet, pixels: list[np.ndarray]) -> list[Request]:
    """The HTTP requests one system gets: the JPEG files (multipart) or, for ``/v2``, the decoded pixels."""
    if system.route == "grpc":
        raise ValueError(f"{system.name} is served over gRPC; see load_for")
    if system.route == "v2":
        return [v2_request(port, model, p) for p in pixels]
    path = f"/v1/models/{model}/classify" if system.route == "v1" else "/predict"
    return [
        multipart_request(HOST, port, path, n, j, "image/jpeg") for n, j in zip(images.names, images.jpegs, strict=True)
    ]


@dataclass(frozen=True)
class HttpLoad:
    """A system's clients over HTTP/1.1: its prepared requests and its port."""

    port: int
    requests: list[Request]

    async def run(
        self, plan: LoadPlan, on_window_start: Hook | None = None, on_window_end: Hook | None = None
    ) -> LevelResult:
        return await run_level(HOST, self.port, self.requests, plan, on_window_start, on_window_end)


@dataclass(frozen=True)
class GrpcLoad:
    """A system's clients over gRPC: its prepared ModelInfer requests, the server's gRPC port and the channels
    (0: one per client)."""

    port: int
    requests: list[GrpcRequest]
    channels: int = 0

    async def run(
        self, plan: LoadPlan, on_window_start: Hook | None = None, on_window_end: Hook | None = None
    ) -> LevelResult:
        return await run_grpc_level(
            HOST, self.port, self.requests, plan, on_window_start, on_window_end, channels=self.channels
        )


Load = HttpLoad | GrpcLoad


def load_for(
    system: System,
    ports: Ports,
    model: str,
    images: ImageSet,
    pixels: list[np.ndarray],
    grpc_channels: int = 0,
) -> Load:
    """What one system's clients send, and where: gRPC ModelInfer with the decoded pixels for ``grpc``, else the
    HTTP requests of ``requests_for``."""
    if system.route == "grpc":
        if not ports.grpc:
            raise ValueError(f"{system.name} needs a server started with a gRPC port")
        return GrpcLoad(ports.grpc, [GrpcRequest.infer(model, p) for p in pixels], grpc_channels)
    return HttpLoad(ports.http, requests_for(system, ports.http, model, images, pixels))


@dataclass(frozen=True)
class Ports:
    """Where one server process listens: HTTP, and gRPC (0: not at all)."""

    http: int
    grpc: int = 0


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports nobody listens on right now, all held open at once while they are found so
    that no two are the same (another process may still take one before the server does)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ports_for(systems: list[System]) -> Ports:
    """Free ports for the server process of ``systems``: a gRPC port only where one of them uses gRPC."""
    if any(s.route == "grpc" for s in systems):
        http, grpc = free_ports(2)
        return Ports(http, grpc)
    return Ports(free_ports(1)[0])


def model_parameters(port: int, model: str) -> dict[str, Any]:
    """What our server says of a model's batching in ``GET /v2/models/{model}`` (``parameters``): the batch size
    it chose, whether it measured it, its images/s by batch size, and its lanes."""
    import asyncio

    status, body = asyncio.run(get(HOST, port, f"/v2/models/{model}"))
    if status != 200:
        return {}
    parameters = json.loads(body).get("parameters", {})
    keys = ("max_batch_size", "max_batch_size_measured", "images_per_second_by_batch_size", "max_queue_delay_ms",
            "lanes", "images_per_second_full_session_vs_lanes")  # fmt: skip
    return {k: parameters[k] for k in keys if k in parameters}


# --- server-side counters -----------------------------------------------------------------------

_SAMPLE = re.compile(r'^(?P<name>[a-z_]+)\{model="(?P<model>[^"]*)"\} (?P<value>[-+0-9.eE]+|NaN)$')


def parse_metrics(text: str, model: str) -> dict[str, float]:
    """The per-model samples of the server's Prometheus text (name -> value) for one model."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["model"] == model:
            values[match["name"]] = float(match["value"])
    return values


def group_cpu_seconds(pgid: int) -> float | None:
    """CPU time (user + system, all threads) used so far by the processes of one process group, from
    ``/proc``; None where there is no ``/proc``. Processes that already exited are not counted."""
    proc = Path("/proc")
    if pgid <= 0 or not proc.is_dir():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...; utime and stime at 11, 12
            total += int(fields[11]) + int(fields[12])
    return total / ticks


class Counters:
    """Reads a system's own counters at the window's edges: the server's ``/metrics`` (images, batches,
    seconds in inference calls), the LitServe peer's batch log, and the CPU time of the server's whole
    process group (every system), from which ``totals`` takes the differences."""

    def __init__(self, server: str, port: int, model: str, batch_log: Path, pgid: int = 0) -> None:
        self.server, self.port, self.model, self.batch_log, self.pgid = server, port, model, batch_log, pgid
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}

    async def read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        cpu = group_cpu_seconds(self.pgid)
        if cpu is not None:
            values["cpu_seconds"] = cpu
        if self.server == "stageformer":
            status, body = await get(HOST, self.port, "/metrics")
            values.update(parse_metrics(body.decode(), self.model) if status == 200 else {})
        elif self.server == "litserve":
            try:
                sizes = [int(x) for x in self.batch_log.read_text().split()]
            except (OSError, ValueError):
                return values
            values["stageformer_batch_size_sum"] = float(sum(sizes))
            values["stageformer_batch_size_count"] = float(len(sizes))
        return values

    def hooks(self) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
        async def start() -> None:
            self.before = await self.read()

        async def end() -> None:
            self.after = await self.read()

        return start, end

    def delta(self, name: str) -> float | None:
        if name not in self.before or name not in self.after:
            return None
        return self.after[name] - self.before[name]

    def totals(self) -> dict[str, float]:
        """What happened inside the window: images and batches run, seconds spent in inference calls."""
        found = {
            "images": self.delta("stageformer_batch_size_sum"),
            "batches": self.delta("stageformer_batch_size_count"),
            "inference_s": self.delta("stageformer_inference_seconds_sum"),
            "cpu_s": self.delta("cpu_seconds"),
        }
        return {k: v for k, v in found.items() if v is not None}

    @staticmethod
    def combine(windows: list[dict[str, float]]) -> dict[str, float]:
        """The totals of several windows added up, with the mean batch size where batches were counted."""
        keys = set.intersection(*(set(w) for w in windows)) if windows else set()
        total = {k: sum(w[k] for w in windows) for k in keys}
        if total.get("batches"):
            total["mean_batch"] = total["images"] / total["batches"]
        return total

    def mean_batch(self) -> float | None:
        if self.server in UNBATCHED:
            return 1.0  # one session.run per request, by construction
        return self.combine([self.totals()]).get("mean_batch")

    def inference_seconds(self) -> float | None:
        return self.delta("stageformer_inference_seconds_sum")
