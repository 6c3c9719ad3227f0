"""The HTTP server around the app: uvicorn, with what a server facing the open network needs beyond it.

- **A header deadline.** A connection must deliver a request's headers within ``header_timeout_s`` of
  opening (or of the request's first byte, on a kept-alive connection); otherwise it gets a JSON 408 and is
  closed. uvicorn alone keeps a connection that sends half its headers, or nothing, open for ever.
- **A connection cap.** Beyond ``max_connections`` open connections, a new one gets a JSON 503 and is
  closed at once; idle kept-alive connections close after ``keep_alive_timeout_s``.
- **The drain.** The first SIGTERM (or SIGINT) starts a drain: the listening socket stays open and every new
  request gets 503 with ``Retry-After`` (``Connection: close``) while the requests already in progress finish,
  for at most ``drain_timeout_s``; then uvicorn closes the socket and the connections, the batchers stop, and
  the process exits with status 0. A second signal stops without waiting (uvicorn's own shutdown).

The body's read deadline is ``service.middleware.ReadDeadlineMiddleware``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .metrics import Metrics
from .settings import Settings
from .state import AppState

logger = logging.getLogger(__name__)


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def http_protocol(settings: Settings, metrics: Metrics) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the header deadline and the connection cap of ``settings``."""
    header_timeout = settings.header_timeout_s
    cap = settings.max_connections
    slow = metrics.rejections.labels("", "slow_headers")
    refused = metrics.rejections.labels("", "connection_limit")
    too_slow = _raw_response(408, "Request Timeout", f"the request headers did not arrive within {header_timeout:g} s")
    too_many = _raw_response(
        503, "Service Unavailable", f"the server has {cap} open connections, its limit; retry later"
    ).replace(b"connection: close\r\n", b"connection: close\r\nretry-after: 1\r\n")

    class Protocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > cap:
                refused.inc()
                transport.write(too_many)
                transport.close()
                return
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            slow.inc()
            self.transport.write(too_slow)
            self.transport.close()

    return Protocol


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` as ``settings`` ask (``overrides`` for tests: ``port=0``...)."""
    state: AppState = app.state.stageformer
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": http_protocol(settings, state.metrics),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "timeout_graceful_shutdown": 5,  # after the drain: only answers being written remain
        "lifespan": "on",
    }
    return uvicorn.Config(app, **{**options, **overrides})


def draining_server(config: uvicorn.Config, state: AppState) -> uvicorn.Server:
    """A uvicorn server that drains on the first SIGTERM/SIGINT (see the module docstring)."""

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # In a signal handler: set flags only. From here on every new request gets 503.
            if self.started and not self.should_exit and state.draining_since is None:
                state.begin_drain()
            else:
                super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if state.draining_since is not None and not self.should_exit:
                self._drain_step(counter)
            return await super().on_tick(counter)

        def _drain_step(self, counter: int) -> None:
            assert state.draining_since is not None
            waited = time.monotonic() - state.draining_since
            if counter % 10 == 0 or waited < 0.1:
                logger.info("draining: %d request(s) in flight after %.1f s", state.in_flight, waited)
            if state.in_flight == 0:
                logger.info("drained in %.2f s; stopping", waited)
                self.should_exit = True
            elif state.drain_time_left() <= 0 and not state.aborted:
                cut = state.abort_waiting()  # they answer 503 now; the next tick stops the server
                logger.warning(
                    "drain timeout of %g s passed with %d request(s) in flight; %d waiting for inference get 503",
                    state.settings.drain_timeout_s, state.in_flight, cut,
                )  # fmt: skip
            elif state.aborted:
                self.config.timeout_graceful_shutdown = 2
                self.should_exit = True

    return DrainingServer(config)
