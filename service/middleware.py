"""Pure ASGI middleware (cheap on the hot path): the body size limit, the body read deadline, and request
metrics."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import Kind, ServiceError, too_large
from .metrics import Metrics

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})  # others count as "OTHER"


class BodyLimitMiddleware:
    """413 for bodies above ``max_bytes``: at once when Content-Length says so, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes or declared < 0:
                    await _send_error(send, 413 if declared >= 0 else 400, self._message(declared))
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(
                        f"request body is larger than {self.max_bytes:,} bytes; send smaller or fewer images"
                    )
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, declared: int) -> str:
        if declared < 0:
            return "invalid Content-Length header"
        return f"request body is {declared:,} bytes; the limit is {self.max_bytes:,}: send smaller or fewer images"


class ReadDeadlineMiddleware:
    """A request body must keep arriving: by ``grace_s`` seconds after the headers plus one second per
    ``min_rate`` bytes received, the next part must be in (so a declared 100 kB gets 10 s plus 1.5 s at
    64 kB/s, and a client that stalls halfway is cut off as soon as it falls behind that rate). A request
    that misses it gets 408 with ``Connection: close``; the slot it held is released when its handler
    ends, which is at once. Headers have their own deadline, in the HTTP protocol (``service.server``)."""

    def __init__(self, app: ASGIApp, grace_s: float, min_rate: float) -> None:
        self.app = app
        self.grace_s = grace_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = 0
        complete = False

        async def timed_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in; what follows is the disconnect, which may take any time
                return await receive()
            remaining = started + self.grace_s + received / self.min_rate - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                raise ServiceError(
                    Kind.SLOW_CLIENT,
                    f"the request body did not arrive in time: {received:,} bytes in {loop.time() - started:.1f} s; "
                    f"a body must arrive within {self.grace_s:g} s plus 1 s per {self.min_rate / 1024:g} KiB",
                    close=True,
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, timed_receive, send)


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Counts requests by route template, method and status, and times them. Labels come from fixed sets
    (the app's route templates, the standard methods), so no client can create new series."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)
