"""FastAPI dependencies: app state reached through ``Annotated[..., Depends(...)]``, admission control,
the API key check, and inference with the batcher's errors turned into HTTP errors."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, Request

from .batcher import BatchFailedError, NotAcceptingError, QueueFullError, RequestTimeoutError
from .errors import APIError
from .metrics import Metrics
from .registry import ModelRegistry, ServedModel
from .settings import Settings

T = TypeVar("T")

RETRY_AFTER = {"Retry-After": "1"}


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None  # None until the lifespan has loaded every model
    decode_pool: ThreadPoolExecutor | None = None
    ready: bool = False
    draining_since: float | None = None  # time.monotonic() of the shutdown signal; None while serving
    aborted: bool = False  # the drain timeout passed: requests still waiting for inference get 503
    waiting: set[asyncio.Future[list[np.ndarray]]] = field(default_factory=set)  # inference being awaited

    @property
    def in_flight(self) -> int:
        """Admitted requests not finished yet, over all models."""
        return sum(m.active for m in self.registry.models.values()) if self.registry is not None else 0

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
        for work in list(self.waiting):
            work.cancel()
        return len(self.waiting)


async def get_state(request: Request) -> AppState:  # async: no thread-pool hop per request
    state: AppState = request.app.state.stageformer
    return state


State = Annotated[AppState, Depends(get_state)]


async def get_registry(state: State) -> ModelRegistry:
    if state.draining_since is not None:
        raise APIError(
            503, "the server is shutting down; send the request again (to another instance)",
            {**RETRY_AFTER, "Connection": "close"},
        )  # fmt: skip
    if state.registry is None or not state.ready:
        raise APIError(503, "the server is starting; try again shortly", RETRY_AFTER)
    return state.registry


Registry = Annotated[ModelRegistry, Depends(get_registry)]


async def require_api_key(request: Request, state: State) -> None:
    """With an API key set, inference and metadata routes need ``Authorization: Bearer KEY``."""
    key = state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # Digests of equal length, compared in constant time: the time taken tells nothing of the key,
    # not even its length.
    given = hashlib.sha256(token.strip().encode()).digest()
    expected = hashlib.sha256(key.get_secret_value().encode()).digest()
    if not hmac.compare_digest(given, expected) or scheme.lower() != "bearer":
        raise APIError(
            401, "missing or wrong API key; send `Authorization: Bearer <key>`", {"WWW-Authenticate": "Bearer"}
        )


def lookup_model(registry: ModelRegistry, name: str | None) -> ServedModel:
    model = registry.get(name)
    if model is None:
        raise APIError(404, f"unknown model {name!r}; served models: {', '.join(sorted(registry.models))}")
    return model


@contextmanager
def admitted(state: AppState, model: ServedModel) -> Iterator[None]:
    """Admission control, before the body is read or any work done: a model takes at most
    ``max_queue_size + max_batch_size * instances`` requests at once (queued, being decoded or
    running) and none while its queue is full; beyond that a request gets 503 with Retry-After at
    once. This bounds the memory a burst can take; the batcher still counts the queued images."""
    settings = state.settings
    limit = settings.max_queue_size + settings.max_batch_size * settings.instances
    if model.active >= limit or model.batcher.depth >= model.batcher.max_queue_size:
        state.metrics.rejections.labels(model.name, "queue_full").inc()
        raise APIError(
            503, f"overloaded: model {model.name!r} has {model.active} requests in progress; retry later", RETRY_AFTER
        )
    model.active += 1
    try:
        yield
    finally:
        model.active -= 1


class ClientGoneError(APIError):
    """The client closed its connection while its request waited; nobody will read an answer."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection before the answer was ready")


def _stopped() -> APIError:
    return APIError(
        503, "the server is shutting down and did not run this request; send it again (to another instance)",
        {**RETRY_AFTER, "Connection": "close"},
    )  # fmt: skip


async def _disconnected(request: Request) -> bool:
    """True once the client has gone. Called after the body was read, ``receive`` has nothing else to say."""
    message = await request.receive()
    return message.get("type") == "http.disconnect"


async def _outcome(work: asyncio.Future[T], request: Request | None) -> T:
    """``work``'s result. Cancelled, with ``ClientGoneError``, when the client disconnects first;
    503 when the shutdown cancelled it (``AppState.abort_waiting``)."""
    racing: set[asyncio.Future[Any]] = {work}
    watcher = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    if watcher is not None:
        racing.add(watcher)
    try:
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if work.cancelled():  # not by us: this task is running, so the shutdown cancelled the work
            raise _stopped()
        if not work.done() and watcher is not None and watcher.exception() is None and watcher.result():
            raise ClientGoneError()
        return await work
    finally:
        if watcher is not None:
            watcher.cancel()
        work.cancel()  # a no-op when done; otherwise the batcher skips the request's images


async def run_inference(
    state: AppState, model: ServedModel, inputs: list[np.ndarray], request: Request | None = None
) -> list[np.ndarray]:
    """Batcher results, with its errors turned into HTTP errors. With ``request``, a client that
    disconnects while waiting takes its images out of the queue."""
    if state.aborted:
        raise _stopped()
    work = asyncio.ensure_future(model.infer(inputs, state.settings.request_timeout_s))
    state.waiting.add(work)
    try:
        return await _outcome(work, request)
    except ClientGoneError:
        state.metrics.rejections.labels(model.name, "client_gone").inc()
        raise
    except QueueFullError as exc:
        state.metrics.rejections.labels(model.name, "queue_full").inc()
        raise APIError(503, f"overloaded: {exc}; retry later", RETRY_AFTER) from None
    except NotAcceptingError as exc:
        state.metrics.rejections.labels(model.name, "shutting_down").inc()
        raise APIError(503, str(exc), RETRY_AFTER) from None
    except RequestTimeoutError as exc:
        state.metrics.rejections.labels(model.name, "timeout").inc()
        raise APIError(504, str(exc)) from None
    except BatchFailedError as exc:
        raise APIError(500, f"{exc}; the server logged the details") from None
    finally:
        state.waiting.discard(work)


async def in_decode_pool(state: AppState, fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work (image decoding, preprocessing) in the decode worker pool."""
    return await asyncio.get_running_loop().run_in_executor(state.decode_pool, fn, *args)
