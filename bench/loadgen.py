"""A closed-loop load generator: ``concurrency`` clients, each sending its next request as soon as the previous
answer has arrived. Over HTTP/1.1 (``run_level``) each client holds its own keep-alive connection; the same loop
drives gRPC clients (``bench.grpc_load``).

The HTTP client is written on raw asyncio streams so that it costs little CPU next to the servers it
measures (on a 2-core machine the client and the server share the cores); the CPU time the load generator
spent in each window is recorded beside the figures. Requests are built once, before the clock starts. It
talks only to loopback addresses, and every run is bounded in time and in request count, and stops by itself.

Measurement: clients run through a warm-up, then a measured window ``[start, end)``; a request counts
when it completes inside the window. After the window no new request starts; those in flight finish
(or time out) and are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

LOOPBACK_NAMES = {"localhost"}


class LoadError(RuntimeError):
    """The load generator cannot run as asked; the message says why."""


def check_loopback(host: str) -> None:
    """Refuse any target that is not a loopback address: this tool never sends traffic elsewhere."""
    if host in LOOPBACK_NAMES:
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise LoadError(f"target host {host!r} is not a loopback address; use 127.0.0.1") from None
    if not address.is_loopback:
        raise LoadError(f"target host {host!r} is not a loopback address; the load generator only sends to loopback")


@dataclass(frozen=True)
class Request:
    """One prepared HTTP/1.1 request: the exact bytes sent on the wire."""

    raw: bytes

    @classmethod
    def build(
        cls, method: str, path: str, host: str, port: int, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Request:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        return cls(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def multipart_request(host: str, port: int, path: str, filename: str, data: bytes, content_type: str) -> Request:
    """A ``multipart/form-data`` POST with one file part named ``file`` (what ``curl -F file=@x`` sends)."""
    boundary = "stageformerbenchboundary7d1f0a"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return Request.build("POST", path, host, port, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        check_loopback(host)
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        return self._reader, self._writer

    async def send(self, request: Request) -> tuple[int, bytes]:
        """Send one request and read its whole response: (status, body)."""
        reader, writer = await self._open()
        try:
            writer.write(request.raw)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in header_lines:
                if line:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await _read_chunked(reader)
            else:
                body = await reader.read()
                self.close()
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, body
        except BaseException:
            self.close()  # a half-read response leaves the connection unusable
            raise

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100): the smallest value with at least q% of the
    values at or below it. NaN for no values."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile q must be in (0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class LevelResult:
    """What one concurrency level measured."""

    concurrency: int
    seconds: float  # length of the measured window
    ok: int  # 2xx answers completed inside the window
    errors: int  # failed requests (non-2xx answers, gRPC errors, no answer) completed inside the window
    throughput: float  # ok / seconds
    latency_ms: dict[str, float]  # mean, p50, p95, p99, max of the ok requests
    statuses: dict[str, int] = field(default_factory=dict)  # status, gRPC code or exception name -> count, window
    first_error: str | None = None  # one error message, for the report
    mean_batch: float | None = None  # from the server's own counters, where it has them
    extra: dict[str, Any] = field(default_factory=dict)
    client_cpu_s: float | None = None  # CPU time of the load generator's process over the window
    samples_s: list[float] = field(default_factory=list, repr=False)  # the ok latencies, for merging windows

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["samples_s"]
        return data


def merge(results: Sequence[LevelResult]) -> LevelResult:
    """Several windows of one level as one: their times, requests and latencies pooled."""
    if not results or len({r.concurrency for r in results}) != 1:
        raise ValueError("merge needs one or more windows of the same concurrency")
    statuses: dict[str, int] = {}
    for r in results:
        for status, n in r.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    samples = [x for r in results for x in r.samples_s]
    first_error = next((r.first_error for r in results if r.first_error), None)
    merged = summarize(results[0].concurrency, sum(r.seconds for r in results), samples, statuses, first_error)
    cpu = [r.client_cpu_s for r in results]
    merged.client_cpu_s = None if None in cpu else sum(c for c in cpu if c is not None)
    return merged


def summarize(
    concurrency: int,
    seconds: float,
    latencies_s: Sequence[float],
    statuses: dict[str, int],
    first_error: str | None = None,
) -> LevelResult:
    """Throughput and latency figures from the successful requests' latencies and the count of every outcome
    (``statuses``, successes included): every request counted there without a latency is an error."""
    if seconds <= 0:
        raise ValueError("the measured window must be longer than 0 s")
    ok = len(latencies_s)
    errors = max(0, sum(statuses.values()) - ok)
    ms = [x * 1000.0 for x in latencies_s]
    latency = {
        "mean": sum(ms) / ok if ok else math.nan,
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else math.nan,
    }
    return LevelResult(
        concurrency,
        seconds,
        ok,
        errors,
        ok / seconds,
        latency,
        dict(statuses),
        first_error,
        samples_s=list(latencies_s),
    )


# --- the closed loop ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    """How long and how much one level runs. Every bound holds on its own."""

    concurrency: int
    duration_s: float  # measured window
    warmup_s: float = 1.0  # before the window, not counted; it also lasts until every client had an answer
    max_requests: int = 200_000  # most requests started in total, warm-up included
    request_timeout_s: float = 60.0  # a request slower than this is an error (and its connection is dropped)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.duration_s <= 0 or self.warmup_s < 0 or self.max_requests < 1:
            raise ValueError("concurrency and max_requests must be >= 1, duration > 0 and warm-up >= 0")


Hook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Outcome:
    """What one request came to."""

    label: str  # counted in ``statuses``: an HTTP status, a gRPC status code's name or an exception's name
    ok: bool
    error: str | None = None  # what went wrong, for the report
    unreachable: bool = False  # no answer at all (refused, reset, timed out): wait a little before the next try


class Client(Protocol):
    """One client of the closed loop, on its own connection (or a channel it may share): sends prepared request
    number ``which`` and says how it went. Errors of the transport are outcomes, not exceptions."""

    async def send(self, which: int) -> Outcome: ...

    async def close(self) -> None: ...


class HttpClient:
    """A closed-loop client on one keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int, requests: Sequence[Request]) -> None:
        self.connection = Connection(host, port)
        self.requests = requests

    async def send(self, which: int) -> Outcome:
        try:
            status, body = await self.connection.send(self.requests[which])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            return failed(exc)
        if 200 <= status < 300:
            return Outcome(str(status), True)
        return Outcome(str(status), False, f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}")

    async def close(self) -> None:
        self.connection.close()


def failed(exc: BaseException) -> Outcome:
    """The outcome of a request that got no answer."""
    name = type(exc).__name__
    return Outcome(name, False, f"{name}: {exc}", unreachable=True)


async def run_level(
    host: str,
    port: int,
    requests: Sequence[Request],
    plan: LoadPlan,
    on_window_start: Hook | None = None,
    on_window_end: Hook | None = None,
) -> LevelResult:
    """Run one closed-loop level over HTTP/1.1, each client on its own keep-alive connection. Client ``i``
    sends ``requests[(i + k) % len(requests)]`` as its k-th request, so every image is sent about equally
    often. The hooks run at the window's edges (to read the server's counters); their time is inside the
    window."""
    check_loopback(host)
    if not requests:
        raise LoadError("no requests to send")
    return await closed_loop(
        plan, len(requests), lambda _: HttpClient(host, port, requests), on_window_start, on_window_end
    )


async def closed_loop(
    plan: LoadPlan,
    count: int,
    open_client: Callable[[int], Client],
    on_window_start: Hook | None = None,
    on_window_end: Hook | None = None,
) -> LevelResult:
    """Run one closed-loop level with ``plan.concurrency`` clients made by ``open_client(i)``; client ``i``
    sends request number ``(i + k) % count`` as its k-th. Besides the answers, the CPU time of this whole
    process (all its threads) is taken over the window: what the load generator itself cost."""
    loop = asyncio.get_running_loop()
    window: dict[str, float] = {}
    records: list[tuple[float, float, str]] = []  # (finished, latency, outcome) of every request
    successes: set[str] = set()
    first_error: list[str] = []
    started = 0
    hard_stop = loop.time() + plan.warmup_s + plan.duration_s + plan.request_timeout_s + 30.0

    async def run_client(index: int) -> None:
        nonlocal started
        client = open_client(index)
        k = 0
        try:
            while "end" not in window and started < plan.max_requests and loop.time() < hard_stop:
                which = (index + k) % count
                k += 1
                started += 1
                t0 = time.perf_counter()
                try:
                    outcome = await asyncio.wait_for(client.send(which), plan.request_timeout_s)
                except TimeoutError as exc:
                    outcome = failed(exc)
                finished = time.perf_counter()
                records.append((finished, finished - t0, outcome.label))
                if outcome.ok:
                    successes.add(outcome.label)
                elif outcome.error and not first_error:
                    first_error.append(outcome.error)
                if outcome.unreachable:
                    await asyncio.sleep(0.05)  # a refused connection must not turn into a busy loop
                if len(records) >= plan.concurrency:
                    warm.set()
        finally:
            await client.close()

    warm = asyncio.Event()  # as many answers as clients: the closed loop has left its start-up burst
    tasks = [asyncio.create_task(run_client(i)) for i in range(plan.concurrency)]
    try:
        await asyncio.sleep(plan.warmup_s)
        if plan.warmup_s > 0:
            await _wait_for_event(warm, tasks, plan.request_timeout_s)
        if on_window_start is not None:
            await on_window_start()
        window["start"], cpu_start = time.perf_counter(), time.process_time()
        await _sleep_unless_done(tasks, plan.duration_s)
        end, cpu_end = time.perf_counter(), time.process_time()
        if on_window_end is not None:
            await on_window_end()
        window["end"] = end
        await asyncio.wait(tasks, timeout=plan.request_timeout_s + 5.0)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
    start = window["start"]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    for finished, latency, label in records:
        if start <= finished < end:
            statuses[label] = statuses.get(label, 0) + 1
            if label in successes:
                latencies.append(latency)
    result = summarize(plan.concurrency, end - start, latencies, statuses, first_error[0] if first_error else None)
    result.client_cpu_s = cpu_end - cpu_start
    return result


async def _wait_for_event(event: asyncio.Event, tasks: Sequence[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait for ``event``, at most ``timeout_s``, or until every client stopped."""
    waiter = asyncio.create_task(event.wait())
    try:
        await asyncio.wait([waiter, *tasks], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def _sleep_unless_done(tasks: Sequence[asyncio.Task[None]], seconds: float) -> None:
    """Sleep ``seconds``, or less when every client already stopped (request budget spent)."""
    await asyncio.wait(tasks, timeout=seconds)


async def get(host: str, port: int, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """One GET on a fresh connection (health checks, metrics)."""
    connection = Connection(host, port)
    try:
        return await asyncio.wait_for(connection.send(Request.build("GET", path, host, port)), timeout_s)
    finally:
        connection.close()
