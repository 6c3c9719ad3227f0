"""Hostile and careless clients: stalled bodies and headers, too many connections, malformed protocol input,
requests that can never fit, huge JSON bodies, clients that vanish mid-upload, an empty API key. The server
answers each with a clear 4xx (or closes the connection) and keeps serving everyone else."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.settings import Settings

from .conftest import png, serve
from .harness import ROOT, LiveServer, classify, live_server, marked_png, metric, request, wait_until

PNG = png()


def _head(port: int, content_length: int, path: str = "/v1/classify") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: {content_length}\r\n\r\n"
    ).encode()


def _answer(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (monotonic)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data, time.monotonic()


@contextmanager
def sockets(port: int, count: int, first_bytes: bytes) -> Iterator[list[socket.socket]]:
    opened = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if first_bytes:
                sock.sendall(first_bytes)
            opened.append(sock)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def _idle(live: LiveServer) -> bool:
    model = live.model("tiny")
    return model.active == 0 and model.arrivals == 0 and model.batcher.expected == 0 and model.batcher.depth == 0


def test_stalled_bodies_keep_nobody_out_and_are_cut_off_at_their_deadline(tiny_onnx: Path) -> None:
    """64 clients send the headers of a 100 kB upload and 4 bytes of it, then stall, against a queue of 16:
    a good client keeps being served, and each stalled one gets 408 when its body deadline passes."""
    grace = 2.0
    settings = {"max_queue_size": 16, "max_batch_size": 4, "max_images": 16, "body_timeout_s": grace}
    with live_server(models=[str(tiny_onnx)], **settings) as live, sockets(live.port, 64, b"") as stalled:
        opened = time.monotonic()
        for sock in stalled:
            sock.sendall(_head(live.port, 100_000) + b"\x89PNG")
        statuses = []
        while time.monotonic() - opened < grace * 0.9:  # the whole time the stalled bodies are pending
            statuses.append(classify(live.port, PNG, timeout_s=10).status)
            time.sleep(0.05)
        assert statuses.count(200) >= 0.95 * len(statuses), statuses
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda s: _answer(s, grace + 5), stalled))
        deadline = grace + 100_000 / Settings().body_min_rate  # the body deadline of a declared 100 kB
        for data, closed_at in answers:
            assert data.startswith(b"HTTP/1.1 408 "), data[:200]
            assert b"connection: close" in data.lower() and b"did not arrive in time" in data
            assert closed_at - opened < deadline + 1.0, closed_at - opened
        wait_until(lambda: _idle(live), what="the admission counts to return to 0")
        text = request(live.port, "GET", "/metrics").body.decode()
        assert metric(text, "stageformer_rejections_total", reason="slow_client") == 64


def test_stalled_and_silent_connections_are_closed_at_the_header_deadline(tiny_onnx: Path) -> None:
    with (
        live_server(models=[str(tiny_onnx)], header_timeout_s=1.0) as live,
        sockets(live.port, 24, b"POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-") as partial,
        sockets(live.port, 8, b"") as silent,
    ):
        opened = time.monotonic()
        assert classify(live.port, PNG).status == 200  # the others are served meanwhile
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda s: _answer(s, 10), partial + silent))
        for data, closed_at in answers:
            assert closed_at - opened < 2.5, closed_at - opened
            assert data.startswith(b"HTTP/1.1 408 ") and b"headers did not arrive" in data, data[:200]
        text = request(live.port, "GET", "/metrics").body.decode()
        assert metric(text, "stageformer_rejections_total", reason="slow_headers") == 32


def test_connections_beyond_the_cap_get_503_and_kept_alive_ones_close_when_idle(tiny_onnx: Path) -> None:
    with (
        live_server(models=[str(tiny_onnx)], max_connections=8, keep_alive_timeout_s=1.0) as live,
        sockets(live.port, 8, b"") as held,
    ):
        with sockets(live.port, 1, b"") as (extra,):
            data, _ = _answer(extra, 5)
        assert data.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in data and b"open connections" in data
        for sock in held:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        started = time.monotonic()
        for sock in held:  # each gets its answer, then the idle connection is closed by the server
            data, closed_at = _answer(sock, 10)
            assert data.startswith(b"HTTP/1.1 200 ")
            assert closed_at - started < 3.0
        assert classify(live.port, PNG).status == 200  # room again


UINT8 = {"name": "image", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}


@pytest.mark.parametrize(
    ("label", "body", "message"),
    [
        ("input parameters a number", {"inputs": [{**UINT8, "parameters": 5}]}, "inputs.0.parameters"),
        ("input parameters a list", {"inputs": [{**UINT8, "parameters": [1]}]}, "inputs.0.parameters"),
        ("input parameters a string", {"inputs": [{**UINT8, "parameters": "x"}]}, "inputs.0.parameters"),
        ("request parameters a list", {"inputs": [UINT8], "parameters": []}, "parameters"),
        ("parameter value an object", {"inputs": [UINT8], "parameters": {"a": {"b": 1}}}, "parameters.a"),
        (
            "output parameters a string",
            {"inputs": [UINT8], "outputs": [{"name": "logits", "parameters": "x"}]},
            "outputs.0.parameters",
        ),
        ("id a number", {"inputs": [UINT8], "id": 7}, "id"),
        (
            "binary_data_output a string",
            {"inputs": [UINT8], "parameters": {"binary_data_output": "yes"}},
            "binary_data_output",
        ),
        ("strings as data", {"inputs": [{**UINT8, "data": ["0"] * 3072}]}, "must be numbers"),
        ("booleans as data", {"inputs": [{**UINT8, "data": [True] * 3072}]}, "must be numbers"),
        ("null as data", {"inputs": [{**UINT8, "data": [None] * 3072}]}, "must be numbers"),
    ],
)
async def test_malformed_protocol_fields_are_400_naming_the_field(
    client: httpx.AsyncClient, label: str, body: object, message: str
) -> None:
    response = await client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 400, (label, response.text)
    assert message in response.json()["error"], (label, response.text)


@pytest.mark.parametrize(
    ("label", "raw", "message"),
    [
        (
            "an integer of 5,000 digits",
            b'{"inputs": [{"name": "image", "shape": [1' + b"0" * 5000 + b"]}]}",
            "not valid JSON",
        ),
        (
            "a value of 10**400",
            json.dumps({"inputs": [{**UINT8, "data": [10**400] + [0] * 3071}]}).encode(),
            "must be numbers",
        ),
        (
            "a float of 1e400",
            json.dumps({"inputs": [{**UINT8, "data": [0] * 3071}]}).replace("[0,", "[1e400, 0,", 1).encode(),
            "0..255",
        ),
    ],
)
async def test_numbers_beyond_range_are_400(client: httpx.AsyncClient, label: str, raw: bytes, message: str) -> None:
    response = await client.post("/v2/models/tiny/infer", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, (label, response.text)
    assert message in response.json()["error"], (label, response.text)


async def test_a_batch_that_can_never_fit_is_413_not_retry(tiny_onnx: Path) -> None:
    async with serve(models=[str(tiny_onnx)], max_queue_size=256, max_images=64) as c:
        blob = bytes(300 * 3072)
        header = json.dumps({"inputs": [{"name": "image", "shape": [300, 32, 32, 3], "datatype": "UINT8",
                                         "parameters": {"binary_data_size": len(blob)}}]}).encode()  # fmt: skip
        response = await c.post("/v2/models/tiny/infer", content=header + blob,
                                headers={"inference-header-content-length": str(len(header))})  # fmt: skip
        assert response.status_code == 413, response.text
        assert "retry-after" not in response.headers
        assert "at most 64" in response.json()["error"]


def test_settings_refuse_more_images_per_request_than_the_queue_holds() -> None:
    with pytest.raises(ValidationError, match="max_images \\(300\\) is larger than max_queue_size \\(256\\)"):
        Settings(max_images=300, max_queue_size=256)


def test_liveness_answers_quickly_while_a_huge_json_body_is_decoded(tiny_onnx: Path) -> None:
    values = np.random.default_rng(0).integers(0, 256, 1200 * 3072).tolist()
    body = json.dumps({"inputs": [{"name": "image", "shape": [1200, 32, 32, 3], "datatype": "UINT8", "data": values}]})
    assert len(body) > 14_000_000
    payload = body.encode()  # once, before probing: encoding holds this process's GIL, which the probe needs too
    with live_server(models=[str(tiny_onnx)], max_body_bytes=32 * 1024 * 1024, max_images=256) as live:
        done = threading.Event()
        worst: list[float] = []

        def probe() -> None:
            while not done.is_set():
                worst.append(request(live.port, "GET", "/v2/health/live").seconds)
                time.sleep(0.002)  # often enough that two bodies give the 20 answers asked for below

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            # At least two bodies, and more until the probe has sampled enough: a fast machine decodes one quickly.
            for sent in range(1, 11):
                reply = request(live.port, "POST", "/v2/models/tiny/infer", payload,
                                {"content-type": "application/json"})  # fmt: skip
                assert reply.status == 413 and b"at most 256" in reply.body, reply.body[:300]
                if sent >= 2 and len(worst) >= 20:
                    break
        finally:
            done.set()
            prober.join()
        assert len(worst) >= 20 and max(worst) < 0.15, (len(worst), sorted(worst)[-5:])


def test_a_client_that_vanishes_mid_upload_is_no_error_of_the_server(
    tiny_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with live_server(models=[str(tiny_onnx)]) as live, caplog.at_level(logging.INFO):
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
                sock.sendall(_head(live.port, 100_000) + PNG[:100])
                wait_until(lambda: live.model("tiny").arrivals == 1, what="the upload to start")
        wait_until(lambda: _idle(live), what="the admission counts to return to 0")
        text = request(live.port, "GET", "/metrics").body.decode()
        assert metric(text, "stageformer_rejections_total", reason="client_gone") == 5
        assert 'status="500"' not in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_admission_counts_return_to_zero_after_every_kind_of_failure(tiny_onnx: Path) -> None:
    with live_server(models=[str(tiny_onnx)], body_timeout_s=0.5, request_timeout_s=2.0, max_queue_size=4,
                     max_images=4, max_batch_size=1) as live:  # fmt: skip
        port = live.port
        outcomes = {
            "bad image": classify(port, b"not an image").status,
            "too many images": request(port, "POST", "/v1/classify", *_multipart(5)).status,
            "bad tensor": request(port, "POST", "/v2/models/tiny/infer", b'{"inputs": 1}').status,
        }
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # a stalled body
            sock.sendall(_head(port, 10_000))
            outcomes["stalled body"] = int(_answer(sock, 5)[0][9:12])
        from .harness import GatedRun

        gated = GatedRun.stuck(live.model("tiny").batcher)
        with ThreadPoolExecutor(8) as pool:
            stuck = [pool.submit(classify, port, marked_png(i)) for i in range(8)]
            replies = [f.result() for f in stuck]
        gated.gate.set()
        outcomes["stuck model"] = sorted({r.status for r in replies})  # admitted ones time out, the rest 503
        assert outcomes == {"bad image": 415, "too many images": 413, "bad tensor": 400, "stalled body": 408,
                            "stuck model": [503, 504]}, outcomes  # fmt: skip
        wait_until(lambda: _idle(live), what="the admission counts to return to 0")
        assert classify(port, PNG).status == 200


def _multipart(n: int) -> tuple[bytes, dict[str, str]]:
    request_ = httpx.Request("POST", "http://test/", files=[("file", (f"{i}.png", PNG, "image/png")) for i in range(n)])
    return request_.read(), dict(request_.headers)


async def test_metric_labels_come_from_fixed_sets(client: httpx.AsyncClient) -> None:
    for i in range(20):
        await client.request("BREW" if i % 2 else "GET", f"/random/path/{i}")
    text = (await client.get("/metrics")).text
    assert "/random" not in text and "BREW" not in text
    assert (
        metric(text, "stageformer_requests_total", route="unmatched", method="OTHER", status="405")
        + metric(text, "stageformer_requests_total", route="unmatched", method="OTHER", status="404")
        == 10
    )


def test_an_empty_api_key_is_refused_at_start() -> None:
    for key in ("", "   "):
        with pytest.raises(ValidationError, match="empty or blank"):
            Settings(api_key=key)
    result = subprocess.run(
        [sys.executable, "-m", "stageformer", "serve", "--port", "0"],
        env={**os.environ, "STAGEFORMER_API_KEY": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "API key is empty or blank" in result.stderr, result.stderr


async def test_concurrent_bad_and_good_requests_leave_nothing_behind(client: httpx.AsyncClient) -> None:
    bad = [client.post("/v2/models/tiny/infer", content=b'{"inputs": [{"parameters": 1}]}') for _ in range(20)]
    good = [client.post("/v1/models/tiny/classify", content=PNG, headers={"content-type": "image/png"})
            for _ in range(20)]  # fmt: skip
    responses = await asyncio.gather(*bad, *good)
    assert [r.status_code for r in responses] == [400] * 20 + [200] * 20
    state = client.app.state.stageformer  # type: ignore[attr-defined]
    assert all(m.active == 0 and m.arrivals == 0 and m.batcher.expected == 0 for m in state.registry.models.values())
