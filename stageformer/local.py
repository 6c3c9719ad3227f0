"""Servers on this machine, for the tests, the benchmark and scripts: a free port, waiting until a server is
ready, a process's resident memory. Standard library only."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable

READY_PATH = "/v2/health/ready"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may still take it before you do)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_status(port: int, path: str, host: str = "127.0.0.1", timeout_s: float = 2.0) -> int:
    """The status of ``GET path``; ``OSError`` when nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class NotReadyError(RuntimeError):
    """A server did not become ready: it died, or the time ran out. The message says which."""


def wait_until_ready(
    port: int,
    *,
    died: Callable[[], str | None] = lambda: None,
    timeout_s: float = 120.0,
    path: str = READY_PATH,
    host: str = "127.0.0.1",
    interval_s: float = 0.1,
) -> float:
    """Poll ``GET path`` until it answers 200; returns the seconds waited. ``died`` is asked between polls
    and returns why the server cannot become ready any more (e.g. its process exited), or None."""
    started = time.monotonic()
    while True:
        try:
            if http_status(port, path, host) == 200:
                return time.monotonic() - started
        except (OSError, http.client.HTTPException):
            pass
        reason = died()
        if reason is not None:
            raise NotReadyError(reason)
        if time.monotonic() - started > timeout_s:
            raise NotReadyError(f"the server on port {port} was not ready after {timeout_s:g} s")
        time.sleep(interval_s)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
