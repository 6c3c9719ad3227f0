"""The server's lifecycle state: settings, metrics, the loaded models, readiness and the drain."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .bodies import JsonBodyParser
from .errors import Kind, ServiceError, shutting_down
from .metrics import Metrics
from .registry import ModelRegistry
from .settings import Settings

if TYPE_CHECKING:
    from .repository import Repository


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None  # None until every model is loaded
    decode_pool: ThreadPoolExecutor | None = None
    json_parser: JsonBodyParser = field(default_factory=JsonBodyParser)  # large JSON inference bodies
    repository: Repository | None = None  # loads and unloads models while serving
    ready: bool = False
    draining_since: float | None = None  # time.monotonic() of the shutdown signal; None while serving
    aborted: bool = False  # the drain timeout passed: requests still waiting for inference get 503

    @property
    def in_flight(self) -> int:
        """Requests in progress over all models, from their first byte to their answer."""
        return self.registry.in_flight if self.registry is not None else 0

    def serving(self) -> ModelRegistry:
        """The models, when requests are taken; 503 while starting or shutting down."""
        if self.draining_since is not None:
            raise shutting_down("the server is shutting down; send the request again (to another instance)")
        if self.registry is None or not self.ready:
            raise ServiceError(Kind.UNAVAILABLE, "the server is starting; try again shortly", reason="starting")
        return self.registry

    def begin_drain(self) -> None:
        """Stop admitting requests (503 from now on) and let the admitted ones finish. Sets two
        attributes and nothing else, so a signal handler may call it."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            self.ready = False

    def drain_time_left(self) -> float:
        """Seconds left of the drain timeout (the whole timeout while not draining)."""
        if self.draining_since is None:
            return self.settings.drain_timeout_s
        return max(0.0, self.draining_since + self.settings.drain_timeout_s - time.monotonic())

    def close_timeout(self) -> float:
        """How long the shutdown may wait for the batchers: what is left of the drain timeout, and a
        few seconds at least, for an inference call already running to end (a process that exits
        under a running ONNX Runtime call aborts)."""
        return max(self.drain_time_left(), 5.0)

    def abort_waiting(self) -> int:
        """The drain timeout passed: every request waiting for inference gets 503 now (its images
        leave the queue unrun), and so does every later one. Event loop only."""
        self.aborted = True
        return self.registry.abort() if self.registry is not None else 0
