"""Soak test: steady load on a real ``stageformer serve`` process for N minutes, reporting throughput
over time and the server's resident memory at the start and the end.

    python -m bench.soak --minutes 10                  # the built-in digits demo
    python -m bench.soak --minutes 10 model.onnx --concurrency 8 --out soak.json

Each client thread keeps one HTTP connection and sends, back to back, a mix of what users send: one
image (PNG or JPEG, 28 to 640 pixels), several images in one multipart request, /v2 JSON and binary
tensors, and one request in twenty that is bad on purpose (truncated image, wrong datatype), so
that the error paths run too. The memory baseline is read after a warm-up (allocator pools and
caches fill during the first seconds), then every interval. With ``--bursts N``, the steady load is
followed by N overload bursts of ``--burst-size`` requests sent at once, each on its own connection
(set a small ``--serve-arg=--max-queue-size=16`` to see rejections on a fast model): what got 503 and
how fast, the server's memory before, during and after, and whether it is ready again. The exit
status is 1 when the memory grew by more than ``--max-growth`` percent, when any request failed
other than as intended, or when a burst got anything but 200 or 503 with Retry-After.

Not a CI test: it runs for minutes. Traffic goes to the loopback address only, and it stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.loadgen import percentile
from stageformer.local import NotReadyError, free_port, rss_bytes, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Call:
    """One prepared request and the status it should get."""

    kind: str
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    images: int
    expect: int


@dataclass
class Sample:
    at: float  # seconds since the load started
    kind: str
    status: int  # 0: connection error
    seconds: float
    images: int
    expected: bool


@dataclass
class Recorder:
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample) -> None:
        with self.lock:
            self.samples.append(sample)


def rss_mib(pid: int) -> float:
    return rss_bytes(pid) / 2**20


def fetch_json(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def wait_ready(port: int, process: subprocess.Popen[bytes] | None, timeout_s: float = 120.0) -> None:
    def died() -> str | None:
        if process is None or process.poll() is None:
            return None
        return f"the server exited with status {process.returncode} before it was ready"

    try:
        wait_until_ready(port, died=died, timeout_s=timeout_s, interval_s=0.2)
    except NotReadyError as exc:
        raise SystemExit(str(exc)) from None


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def multipart(images: list[bytes]) -> tuple[bytes, str]:
    boundary = "soak-boundary-7d3f"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def build_calls(model: dict[str, Any], seed: int = 0) -> list[Call]:
    """The request mix for ``model`` (its /v2 metadata): about one call in twenty is bad on purpose."""
    rng = np.random.default_rng(seed)
    name = model["name"]
    spec = model["inputs"][0]
    sample_shape = spec["shape"][1:]
    datatype = spec["datatype"]

    def photo(width: int, height: int) -> np.ndarray:
        base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR))

    images = [
        encode(photo(w, h), fmt)
        for (w, h) in ((28, 28), (64, 48), (160, 120), (320, 240), (640, 480))
        for fmt in ("PNG", "JPEG")
    ]
    image_type = {"content-type": "application/octet-stream"}
    calls = [
        Call(
            "v1 image", "POST", f"/v1/models/{name}/classify", data, {**image_type, "content-type": "image/png"}, 1, 200
        )
        for data in images
    ]
    for count in (2, 4):
        body, content_type = multipart(images[:count])
        calls.append(Call(f"v1 {count} images", "POST", "/v1/classify?top_k=3", body, {"content-type": content_type},
                          count, 200))  # fmt: skip
    dtype = np.uint8 if datatype == "UINT8" else np.float32
    values = rng.integers(0, 256, (2, *sample_shape)) if dtype == np.uint8 else rng.standard_normal((2, *sample_shape))
    tensor: np.ndarray = values.astype(dtype)
    v2 = f"/v2/models/{name}/infer"
    json_body = {"inputs": [{"name": spec["name"], "shape": [2, *sample_shape], "datatype": datatype,
                             "data": tensor.ravel().tolist()}],
                 "outputs": [{"name": model["outputs"][0]["name"], "parameters": {"classification": 3}}]}  # fmt: skip
    calls.append(Call("v2 json", "POST", v2, json.dumps(json_body).encode(), {"content-type": "application/json"}, 2,
                      200))  # fmt: skip
    binary_input = {"name": spec["name"], "shape": [2, *sample_shape], "datatype": datatype,
                    "parameters": {"binary_data_size": tensor.nbytes}}  # fmt: skip
    binary_output = {"name": model["outputs"][0]["name"], "parameters": {"binary_data": True}}
    header = json.dumps({"inputs": [binary_input], "outputs": [binary_output]})
    calls.append(Call("v2 binary", "POST", v2, header.encode() + tensor.tobytes(),
                      {"inference-header-content-length": str(len(header))}, 2, 200))  # fmt: skip
    bad = [
        Call("bad truncated", "POST", "/v1/classify", images[1][: len(images[1]) // 2], {"content-type": "image/jpeg"},
             0, 400),
        Call("bad datatype", "POST", v2, json.dumps({"inputs": [{**json_body["inputs"][0], "datatype": "INT64"}]})
             .encode(), {"content-type": "application/json"}, 0, 400),
    ]  # fmt: skip
    weighted = calls * 10  # about 1 in 20 bad
    return weighted + bad * max(1, len(weighted) // (20 * len(bad)))


def client(port: int, calls: list[Call], stop: threading.Event, started: float, recorder: Recorder, seed: int) -> None:
    rng = random.Random(seed)
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        call = rng.choice(calls)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        begun = time.perf_counter()
        try:
            conn.request(call.method, call.path, body=call.body, headers=call.headers)
            response = conn.getresponse()
            response.read()
            status = response.status
            if response.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException):
            status = 0
            if conn is not None:
                conn.close()
            conn = None
        elapsed = time.perf_counter() - begun
        recorder.add(Sample(time.monotonic() - started, call.kind, status, elapsed, call.images, status == call.expect))
    if conn is not None:
        conn.close()


def burst(port: int, call: Call, size: int, pid: int | None) -> dict[str, Any]:
    """``size`` requests at once, each on its own connection; the server's RSS sampled meanwhile."""
    gate = threading.Barrier(size + 1)
    replies: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        gate.wait()
        begun = time.perf_counter()
        try:
            conn.request(call.method, call.path, body=call.body, headers=call.headers)
            response = conn.getresponse()
            response.read()
            reply = (response.status, time.perf_counter() - begun, response.getheader("retry-after"))
        except (OSError, http.client.HTTPException):
            reply = (0, time.perf_counter() - begun, None)
        finally:
            conn.close()
        with lock:
            replies.append(reply)

    before = rss_mib(pid) if pid else float("nan")
    threads = [threading.Thread(target=one, daemon=True) for _ in range(size)]
    for thread in threads:
        thread.start()
    gate.wait()
    peak = before
    while any(t.is_alive() for t in threads):
        if pid:
            peak = max(peak, rss_mib(pid))
        time.sleep(0.02)
    after = rss_mib(pid) if pid else float("nan")
    rejected = [r for r in replies if r[0] == 503]
    status, _ = fetch_json(port, "/v2/health/ready")
    return {
        "size": size,
        "ok": sum(r[0] == 200 for r in replies),
        "rejected_503": len(rejected),
        "rejected_with_retry_after": sum(r[2] is not None for r in rejected),
        "other": sum(r[0] not in (200, 503) for r in replies),
        "rejection_p50_ms": percentile([r[1] * 1000 for r in rejected], 50),
        "rejection_max_ms": max((r[1] * 1000 for r in rejected), default=float("nan")),
        "accepted_max_ms": max((r[1] * 1000 for r in replies if r[0] == 200), default=float("nan")),
        "rss_before_mib": before,
        "rss_peak_mib": peak,
        "rss_after_mib": after,
        "ready_after": status == 200,
    }


def run(args: argparse.Namespace) -> int:
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    pid: int | None
    if args.url_port:
        port, pid = args.url_port, args.pid
    else:
        port = free_port()
        command = [sys.executable, "-m", "stageformer", "serve", *args.models, "--port", str(port),
                   "--log-level", "warning", "--grpc-port", "0", *args.serve_args]  # fmt: skip
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pid = process.pid
    try:
        wait_ready(port, process)
        _, models = fetch_json(port, "/v1/models")
        name = args.model_name or models["default"]
        _, metadata = fetch_json(port, f"/v2/models/{name}")
        calls = build_calls(metadata)
        recorder = Recorder()
        stop = threading.Event()
        started = time.monotonic()
        duration = args.minutes * 60.0
        threads = [
            threading.Thread(target=client, args=(port, calls, stop, started, recorder, i), daemon=True)
            for i in range(args.concurrency if duration > 0 else 0)
        ]
        for thread in threads:
            thread.start()
        memory: list[tuple[float, float]] = [(0.0, rss_mib(pid))] if pid else []
        rows: list[dict[str, Any]] = []
        seen = 0
        next_tick = args.interval
        print(f"soak: {args.concurrency} clients for {args.minutes:g} min on model {name!r} (pid {pid}, port {port})")
        if duration > 0:
            print(f"{'t (s)':>7} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'RSS MiB':>8}")
        while duration > 0:
            now = time.monotonic() - started
            if now < min(next_tick, duration):
                time.sleep(min(next_tick, duration) - now)
                continue
            now = time.monotonic() - started
            with recorder.lock:
                window = recorder.samples[seen:]
                seen = len(recorder.samples)
            span = now - (rows[-1]["t"] if rows else 0.0)
            rss = rss_mib(pid) if pid else float("nan")
            if pid:
                memory.append((now, rss))
            latencies = [s.seconds * 1000 for s in window if s.expected and s.status == 200]
            row = {
                "t": round(now, 1),
                "requests_per_s": len(window) / span,
                "images_per_s": sum(s.images for s in window if s.status == 200) / span,
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "unexpected": sum(not s.expected for s in window),
                "rss_mib": rss,
            }
            rows.append(row)
            print(f"{row['t']:7.0f} {row['requests_per_s']:8.1f} {row['images_per_s']:8.1f} {row['p50_ms']:8.1f} "
                  f"{row['p99_ms']:8.1f} {row['unexpected']:7d} {row['rss_mib']:8.1f}")  # fmt: skip
            if now >= duration:
                break
            next_tick += args.interval
        stop.set()
        for thread in threads:
            thread.join(90)
        bursts: list[dict[str, Any]] = []
        for _ in range(args.bursts):
            single = next(c for c in calls if c.kind == "v1 image")
            bursts.append(burst(port, single, args.burst_size, pid))
            b = bursts[-1]
            print(
                f"burst of {b['size']}: {b['ok']} answered 200, {b['rejected_503']} got 503 "
                f"({b['rejected_with_retry_after']} with Retry-After; p50 {b['rejection_p50_ms']:.0f} ms, "
                f"max {b['rejection_max_ms']:.0f} ms), {b['other']} other; RSS {b['rss_before_mib']:.1f} -> "
                f"peak {b['rss_peak_mib']:.1f} -> {b['rss_after_mib']:.1f} MiB; ready after: {b['ready_after']}"
            )
    finally:
        if process is not None:
            process.terminate()  # SIGTERM: the server drains and exits 0
            exit_code = process.wait(60)

    samples = recorder.samples
    seconds = max(args.minutes * 60.0, 1e-9)
    baseline = next(((t, m) for t, m in memory if t >= args.warmup), memory[-1] if memory else (0.0, float("nan")))
    end = memory[-1] if memory else (0.0, float("nan"))
    growth = (end[1] - baseline[1]) / baseline[1] * 100 if memory else float("nan")
    by_status: dict[str, int] = {}
    for s in samples:
        by_status[str(s.status)] = by_status.get(str(s.status), 0) + 1
    unexpected = sum(not s.expected for s in samples)
    ok = [s for s in samples if s.status == 200]
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "model": name,
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "requests": len(samples),
        "by_status": by_status,
        "unexpected": unexpected,
        "requests_per_s": len(samples) / seconds,
        "images_per_s": sum(s.images for s in ok) / seconds,
        "p50_ms": percentile([s.seconds * 1000 for s in ok], 50),
        "p99_ms": percentile([s.seconds * 1000 for s in ok], 99),
        "rss_start_mib": baseline[1],
        "rss_start_at_s": baseline[0],
        "rss_end_mib": end[1],
        "rss_growth_percent": growth,
        "rss_first_mib": memory[0][1] if memory else float("nan"),
        "rss_max_mib": max((m for _, m in memory), default=float("nan")),
        "server_exit_code": exit_code,
        "bursts": bursts,
        "intervals": rows,
    }
    print(
        f"\n{len(samples):,} requests ({summary['requests_per_s']:.1f}/s, {summary['images_per_s']:.1f} images/s), "
        f"statuses {by_status}, unexpected {unexpected}; p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms"
    )
    print(
        f"RSS: {summary['rss_first_mib']:.1f} MiB when ready, {baseline[1]:.1f} MiB after the {baseline[0]:.0f} s "
        f"warm-up, {end[1]:.1f} MiB at the end ({growth:+.2f}%), peak {summary['rss_max_mib']:.1f} MiB; "
        f"server exit code {exit_code}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    burst_failed = any(b["other"] or b["rejected_with_retry_after"] != b["rejected_503"] or not b["ready_after"]
                       for b in bursts)  # fmt: skip
    failed = growth > args.max_growth or unexpected > 0 or exit_code not in (0, None) or burst_failed
    if failed:
        print(f"FAILED: growth {growth:.2f}% (limit {args.max_growth}%), unexpected answers {unexpected}, "
              f"exit code {exit_code}, bursts failed: {burst_failed}")  # fmt: skip
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help="ONNX files to serve (default: the digits demo)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads, one connection each (default 4)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds per reported row (default 30)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the memory baseline (default 30)")
    parser.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth in percent (default 5)")
    parser.add_argument("--bursts", type=int, default=0, help="overload bursts after the steady load (default 0)")
    parser.add_argument("--burst-size", type=int, default=400, help="requests sent at once per burst (default 400)")
    parser.add_argument("--model-name", help="model to load (default: the server's default model)")
    parser.add_argument("--out", help="write the figures as JSON to this file")
    parser.add_argument("--port", dest="url_port", type=int, help="use a server already running on this port")
    parser.add_argument("--pid", type=int, help="with --port: the server's process id, for its memory")
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[], metavar="ARG",
                        help="extra argument for `stageformer serve` (repeat for several)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.minutes < 0 or args.concurrency < 1 or args.interval <= 0 or (args.minutes == 0 and args.bursts < 1):
        parser.error("--minutes must be positive (or 0 with --bursts), --interval positive, --concurrency at least 1")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
