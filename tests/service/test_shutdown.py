"""SIGTERM on a real server process under load: the requests it admitted finish, new ones (new
connections and kept-alive ones alike) get 503 with Retry-After while it drains, and it exits 0
within the drain timeout."""

from __future__ import annotations

import http.client
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .harness import Reply, classify, marked_png, metric, request, server_process, slow_model, wait_until


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slow_model(tmp_path_factory.mktemp("slow") / "slow.onnx")


def queue_depth(port: int) -> float:
    return metric(request(port, "GET", "/metrics").body.decode(), "stageformer_queue_depth", model="slow")


def test_sigterm_under_load_drains_answers_new_requests_503_and_exits_zero(slow_onnx: Path) -> None:
    drain_timeout = 20.0
    args = (str(slow_onnx), "--max-batch-size", "1", "--max-queue-delay-ms", "0", "--drain-timeout-s", "20")
    with server_process(*args) as (port, process):
        with ThreadPoolExecutor(12) as pool:
            loaded = [pool.submit(classify, port, marked_png(i)) for i in range(12)]
            wait_until(lambda: queue_depth(port) >= 6, 30, "a queue to drain")
            kept = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            assert request(port, "GET", "/v2/models/slow", connection=kept).status == 200  # kept alive
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: request(port, "GET", "/v2/health/ready").status == 503, 5, "the drain to start")
            during: list[Reply] = [
                classify(port, marked_png(200)),  # a new connection
                request(port, "POST", "/v1/classify", marked_png(201), {"content-type": "image/png"}, connection=kept),
                request(port, "GET", "/v2/models/slow"),
            ]
            live = request(port, "GET", "/v2/health/live")
            finished = [f.result() for f in loaded]
        assert process.wait(drain_timeout) == 0
        exited_after = time.monotonic() - signalled
    for reply in during:
        assert reply.status == 503, reply.body
        assert reply.headers["retry-after"] == "1" and reply.headers["connection"] == "close"
        assert "shutting down" in reply.json()["error"]
    assert live.status == 200  # alive while draining, only not ready
    assert [r.status for r in finished] == [200] * 12, "every admitted request finished"
    assert exited_after < drain_timeout
    with pytest.raises(OSError):
        classify(port, marked_png(0), timeout_s=2)


def test_an_idle_server_exits_at_once_and_a_stuck_drain_ends_at_the_drain_timeout(slow_onnx: Path) -> None:
    with server_process(str(slow_onnx)) as (port, process):
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert time.monotonic() - signalled < 3.0, "nothing in flight: nothing to wait for"

    args = (str(slow_onnx), "--max-batch-size", "1", "--max-queue-delay-ms", "0", "--drain-timeout-s", "1")
    with server_process(*args) as (port, process), ThreadPoolExecutor(120) as pool:
        loaded = [pool.submit(classify, port, marked_png(i % 250)) for i in range(120)]
        wait_until(lambda: queue_depth(port) >= 60, 30, "a long queue")  # seconds of work
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        exited_after = time.monotonic() - signalled
        replies = [f.result() for f in loaded]
    assert 1.0 <= exited_after < 1.0 + 4.0, f"exited {exited_after:.1f} s after SIGTERM with a 1 s drain timeout"
    statuses = [r.status for r in replies]
    assert 0 < statuses.count(200) < 120 and set(statuses) == {200, 503}, statuses
    for reply in replies:
        if reply.status == 503:  # still queued at the drain timeout, or late: told to retry, never run
            assert "shutting down" in reply.json()["error"] and reply.headers["retry-after"] == "1"
