"""The load generator: its statistics, its requests on the wire, and a closed loop against a small
asyncio HTTP server in this process (loopback only)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from bench.loadgen import (
    Connection,
    LoadError,
    LoadPlan,
    Request,
    check_loopback,
    merge,
    multipart_request,
    percentile,
    run_level,
    summarize,
)

# --- statistics ---------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [15, 20, 35, 40, 50]
    assert percentile(values, 5) == 15
    assert percentile(values, 30) == 20
    assert percentile(values, 40) == 20
    assert percentile(values, 50) == 35
    assert percentile(values, 100) == 50
    hundred = list(range(100, 0, -1))  # order does not matter
    assert percentile(hundred, 99) == 99
    assert percentile(hundred, 50) == 50
    assert percentile([7.0], 99) == 7.0


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    for bad in (0, -1, 101):
        with pytest.raises(ValueError, match="percentile"):
            percentile([1.0], bad)


def test_summarize_counts_errors_and_throughput() -> None:
    latencies = [0.010, 0.020, 0.030, 0.040]
    result = summarize(4, 2.0, latencies, {"200": 4, "503": 2, "TimeoutError": 1}, "HTTP 503: busy")
    assert result.ok == 4
    assert result.errors == 3
    assert result.throughput == pytest.approx(2.0)
    assert result.latency_ms["mean"] == pytest.approx(25.0)
    assert result.latency_ms["p50"] == pytest.approx(20.0)
    assert result.latency_ms["p99"] == pytest.approx(40.0)
    assert result.latency_ms["max"] == pytest.approx(40.0)
    assert result.first_error == "HTTP 503: busy"
    assert result.to_dict()["statuses"] == {"200": 4, "503": 2, "TimeoutError": 1}


def test_summarize_without_answers_and_bad_window() -> None:
    result = summarize(1, 1.0, [], {"ConnectionRefusedError": 3})
    assert result.ok == 0 and result.errors == 3 and result.throughput == 0
    assert math.isnan(result.latency_ms["p50"])
    with pytest.raises(ValueError, match="window"):
        summarize(1, 0.0, [], {})


def test_load_plan_is_bounded() -> None:
    with pytest.raises(ValueError):
        LoadPlan(0, 1.0)
    with pytest.raises(ValueError):
        LoadPlan(1, 0.0)
    with pytest.raises(ValueError):
        LoadPlan(1, 1.0, max_requests=0)


# --- requests -----------------------------------------------------------------------------------


def test_only_loopback_targets() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_loopback(host)
    for host in ("10.0.0.1", "192.168.1.1", "8.8.8.8", "example.com", "0.0.0.0"):
        with pytest.raises(LoadError, match="loopback"):
            check_loopback(host)
    with pytest.raises(LoadError):
        Connection("10.1.2.3", 80)


def test_request_bytes() -> None:
    raw = Request.build("POST", "/x", "127.0.0.1", 8000, b"abc", {"Content-Type": "text/plain"}).raw
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /x HTTP/1.1"
    assert "Host: 127.0.0.1:8000" in lines and "Content-Length: 3" in lines and "Content-Type: text/plain" in lines
    assert body == b"abc"
    get = Request.build("GET", "/health", "127.0.0.1", 1).raw
    assert b"Content-Length" not in get and get.endswith(b"\r\n\r\n")


def test_multipart_request_carries_the_file() -> None:
    raw = multipart_request("127.0.0.1", 8000, "/v1/classify", "cat.jpg", b"\xff\xd8JPEG\xff\xd9", "image/jpeg").raw
    head, body = raw.split(b"\r\n\r\n", 1)
    boundary = head.decode().split("boundary=")[1].split("\r\n")[0]
    assert body.startswith(f"--{boundary}\r\n".encode())
    assert b'name="file"; filename="cat.jpg"' in body
    assert b"\r\n\r\n\xff\xd8JPEG\xff\xd9\r\n" in body
    assert body.endswith(f"--{boundary}--\r\n".encode())
    assert f"Content-Length: {len(body)}".encode() in head


# --- a closed loop against a real socket ----------------------------------------------------------


@asynccontextmanager
async def http_server(delay_s: float = 0.0, fail_every: int = 0, chunked: bool = False) -> AsyncIterator[dict]:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 that answers every request with ``ok``; every
    ``fail_every``-th request gets 503. ``state`` counts requests and connections."""
    state = {"requests": 0, "connections": 0, "port": 0, "max_open": 0, "open": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["connections"] += 1
        state["open"] += 1
        state["max_open"] = max(state["max_open"], state["open"])
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":")[1])
                await reader.readexactly(length)
                state["requests"] += 1
                await asyncio.sleep(delay_s)
                status = "503 Service Unavailable" if fail_every and state["requests"] % fail_every == 0 else "200 OK"
                if chunked:
                    body = b"2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n"
                    writer.write(f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + body)
                else:
                    writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok".encode())
                await writer.drain()
        finally:
            state["open"] -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state["port"] = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


async def test_closed_loop_keeps_one_connection_per_client() -> None:
    async with http_server(delay_s=0.002) as state:
        port = state["port"]
        requests = [Request.build("POST", "/p", "127.0.0.1", port, b"x" * n) for n in (1, 2, 3)]
        result = await run_level("127.0.0.1", port, requests, LoadPlan(4, 0.3, warmup_s=0.05))
    assert result.errors == 0 and result.ok > 10
    assert state["connections"] == 4 and state["max_open"] == 4  # keep-alive: never a new connection
    assert result.throughput == pytest.approx(result.ok / result.seconds)
    assert 2.0 <= result.latency_ms["p50"] < 200.0  # at least the server's 2 ms
    assert result.statuses == {"200": result.ok}


async def test_errors_are_counted_and_the_first_is_kept() -> None:
    async with http_server(fail_every=3) as state:
        port = state["port"]
        result = await run_level(
            "127.0.0.1", port, [Request.build("GET", "/", "127.0.0.1", port)], LoadPlan(2, 0.2, 0.0)
        )
    assert result.errors > 0 and result.ok > 0
    assert result.statuses["503"] == result.errors
    assert result.first_error is not None and result.first_error.startswith("HTTP 503")
    assert result.ok == pytest.approx(2 * result.errors, rel=0.02, abs=4)  # every third answer is a 503


async def test_chunked_answers_are_read_whole() -> None:
    async with http_server(chunked=True) as state:
        connection = Connection("127.0.0.1", state["port"])
        request = Request.build("GET", "/", "127.0.0.1", state["port"])
        assert await connection.send(request) == (200, b"ok!!!")
        assert await connection.send(request) == (200, b"ok!!!")  # the connection stays usable
        connection.close()


async def test_request_budget_ends_the_level_early() -> None:
    async with http_server() as state:
        port = state["port"]
        plan = LoadPlan(2, 30.0, warmup_s=0.0, max_requests=20)
        result = await asyncio.wait_for(
            run_level("127.0.0.1", port, [Request.build("GET", "/", "127.0.0.1", port)], plan), 10
        )
    assert state["requests"] <= 20
    assert result.seconds < 10


async def test_refused_connections_are_errors_not_a_busy_loop() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await run_level("127.0.0.1", port, [Request.build("GET", "/", "127.0.0.1", port)], LoadPlan(2, 0.3, 0.0))
    assert result.ok == 0
    assert 0 < result.errors < 40  # each failure waits before the next try
    assert result.first_error is not None and "Error" in result.first_error


def test_merge_pools_windows() -> None:
    first = summarize(8, 2.0, [0.010] * 10, {"200": 10, "503": 1}, "HTTP 503: busy")
    second = summarize(8, 3.0, [0.030] * 20, {"200": 20})
    merged = merge([first, second])
    assert merged.seconds == 5.0 and merged.ok == 30 and merged.errors == 1
    assert merged.throughput == pytest.approx(6.0)
    assert merged.latency_ms["p50"] == pytest.approx(30.0) and merged.latency_ms["mean"] == pytest.approx(70 / 3)
    assert merged.first_error == "HTTP 503: busy" and merged.statuses == {"200": 30, "503": 1}
    assert "samples_s" not in merged.to_dict()
    with pytest.raises(ValueError):
        merge([first, summarize(4, 1.0, [], {})])


async def test_warm_up_lasts_until_every_client_had_an_answer() -> None:
    async with http_server(delay_s=0.2) as state:  # each answer takes 0.2 s, far longer than the warm-up
        port = state["port"]
        request = Request.build("GET", "/", "127.0.0.1", port)
        started = asyncio.get_running_loop().time()
        window_opened: list[float] = []

        async def on_start() -> None:
            window_opened.append(asyncio.get_running_loop().time() - started)

        result = await run_level("127.0.0.1", port, [request], LoadPlan(3, 0.3, warmup_s=0.01), on_start)
    assert window_opened[0] >= 0.19  # the window opened after the first answers, not at 0.01 s
    assert result.ok >= 3
