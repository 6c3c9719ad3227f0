"""One served model's way from a request to its answer: admission → decoded pixels → model input →
dynamic batcher → logits → top-k. ``/v1``, ``/v2``, gRPC and the page all go through it; they only parse
their request and shape the answer.

Admission is in two steps. ``arrival()`` opens when a request for the model starts, before its body is read:
a model that is full refuses at once (nothing read, nothing decoded), otherwise the request is announced to
the batcher, which then waits for it when forming a batch. Once the body is in, ``classify``/``infer`` take
an admission slot (at most ``max_queue_size + max_batch_size x instances`` requests decoding, queued or
running); a request whose body is still arriving holds no slot, so a slow or stalled client keeps nobody
else out (the read deadline of ``service.server`` ends it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from stageformer.core.formats import RAW_INPUT
from stageformer.core.preprocess import normalize, stack

from .batcher import Announcement, Batcher, BatcherError, NotAcceptingError, QueueFullError, RequestTimeoutError
from .errors import Kind, ServiceError, client_gone, shutting_down, too_large
from .images import prepare
from .metrics import Metrics
from .oip import TensorSpec
from .postprocess import Prediction, top_k
from .runtime import ModelInfo, OnnxModel

logger = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[Any]]  # completes when the client has gone


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a model."""

    max_images: int  # images (batch rows) per request
    max_image_pixels: int  # width x height of one uploaded image, read from its header
    request_timeout_s: float  # longest wait for inference
    decode_oversample: float | None = None  # reduced-scale JPEG decoding down to this multiple (None: exact)


class ModelPipeline:
    """A served model: its ONNX Runtime sessions, its batcher, and the steps of a request."""

    def __init__(
        self, runtime: OnnxModel, batcher: Batcher, limits: Limits, metrics: Metrics, decode_pool: Executor
    ) -> None:
        self.runtime = runtime
        self.batcher = batcher
        self.limits = limits
        self.metrics = metrics
        self.decode_pool = decode_pool
        info = runtime.info
        self.input_spec = TensorSpec(info.input_name, "UINT8" if info.input_format == RAW_INPUT else "FP32",
                                     (-1, *info.sample_shape))  # fmt: skip
        self.admission_limit = batcher.max_queue_size + batcher.max_batch_size * batcher.instances
        self.arrivals = 0  # requests from their first byte to their answer (event loop only)
        self.active = 0  # of those, admitted ones: decoding, queued or running (event loop only)
        self.aborted = False  # the drain timeout passed: nothing more runs
        self._waiting: set[asyncio.Future[list[np.ndarray]]] = set()
        self._preprocess_seconds = metrics.preprocess_seconds.labels(info.name)
        self._queue_seconds = metrics.queue_seconds.labels(info.name)

    @property
    def info(self) -> ModelInfo:
        return self.runtime.info

    @property
    def name(self) -> str:
        return self.runtime.info.name

    # --- admission ----------------------------------------------------------------------------------

    def _refuse_if_full(self) -> None:
        if self.active >= self.admission_limit:
            raise self._error(Kind.OVERLOADED, f"overloaded: model {self.name!r} has {self.active} requests in "
                              "progress; retry later", "active_limit")  # fmt: skip
        if self.batcher.depth >= self.batcher.max_queue_size:
            raise self._error(Kind.OVERLOADED, f"overloaded: model {self.name!r} has {self.batcher.depth} images "
                              "waiting; retry later", "queue_full")  # fmt: skip

    @contextmanager
    def arrival(self) -> Iterator[Announcement]:
        """A request from before its body is read to its answer (see the module docstring); its announcement
        to the batcher, to hand to ``classify`` or ``infer``."""
        if self.aborted:
            raise self._stopped()
        self._refuse_if_full()
        announcement = self.batcher.expect()
        self.arrivals += 1
        try:
            yield announcement
        finally:
            self.arrivals -= 1
            self.batcher.withdraw(announcement)  # a no-op once it submitted or ran

    @contextmanager
    def _admitted(self, rows: int) -> Iterator[None]:
        if rows > self.batcher.max_queue_size:
            raise self._error(Kind.TOO_LARGE, f"{rows} images in one request can never fit model {self.name!r}'s "
                              f"queue of {self.batcher.max_queue_size}; send at most {self.batcher.max_queue_size}",
                              "too_large")  # fmt: skip
        self._refuse_if_full()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    # --- the steps ----------------------------------------------------------------------------------

    def _prepare(self, index: int, name: str | None, data: bytes) -> np.ndarray:
        """One uploaded file -> model-ready pixels ``[H, W, 3]`` (a decode-pool job)."""
        what = f"image {name or index}"
        return prepare(data, self.info.preprocess, self.limits.max_image_pixels, what, self.limits.decode_oversample)

    def _model_input(self, pixels: list[np.ndarray]) -> np.ndarray:
        batch = stack(pixels)
        return batch if self.info.input_format == RAW_INPUT else normalize(batch, self.info.preprocess)

    async def decode(self, images: Sequence[tuple[str | None, bytes]]) -> np.ndarray:
        """Uploaded files -> model input ``[batch, ...]``, decoded in the decode pool, in order. The first
        image that cannot be used fails the request, naming it."""
        if len(images) > self.limits.max_images:
            raise too_large(f"{len(images)} images in one request; send at most {self.limits.max_images}")
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.decode_pool, self._prepare, i, name, data)
                for i, (name, data) in enumerate(images)]  # fmt: skip
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._preprocess_seconds.observe((time.perf_counter() - started) / len(images))
        return self._model_input(results)  # type: ignore[arg-type]

    def _decode_and_run_alone(
        self, name: str | None, data: bytes, announcement: Announcement
    ) -> tuple[np.ndarray, bool]:
        """One image decoded in this decode-pool thread and, when the model has nothing else to do, run in it
        too (``Batcher.run_alone``): a lone request crosses no more threads than a plain endpoint's. Returns
        its logits ``[1, classes]`` and True, or its model input ``[1, ...]`` and False when it must queue."""
        started = time.perf_counter()
        batch = self._model_input([self._prepare(0, name, data)])
        self._preprocess_seconds.observe(time.perf_counter() - started)
        if self.aborted:
            return batch, False
        try:
            logits = self.batcher.run_alone(batch, announcement)
        except BatcherError as exc:
            raise self._batcher_error(exc, 0.0, 1) from None
        return (batch, False) if logits is None else (logits, True)

    async def classify(
        self, announcement: Announcement, images: Sequence[tuple[str | None, bytes]], k: int,
        gone: Disconnected | None = None,
    ) -> list[list[Prediction]]:  # fmt: skip
        """Uploaded image files -> the ``k`` most probable classes of each, best first."""
        with self._admitted(len(images)):
            if len(images) == 1:
                logits = await self._classify_one(announcement, *images[0], gone)
            else:
                logits = await self._run(announcement, await self.decode(images), gone)
        return top_k(logits, self.info.labels, k)

    async def _classify_one(
        self, announcement: Announcement, name: str | None, data: bytes, gone: Disconnected | None
    ) -> np.ndarray:
        """One image: decoded, and run in the same thread when it is alone (else queued); its logits."""
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self.decode_pool, self._decode_and_run_alone, name, data, announcement)
        timeout = self.limits.request_timeout_s
        try:  # the request timeout holds here too; a run past it finishes unheard, as a queued one would
            out, ran = await asyncio.wait_for(job, timeout)
        except TimeoutError:
            error = RequestTimeoutError(f"no result within {timeout:g} s; the server is too busy")
            raise self._batcher_error(error, timeout, 1) from None
        return out if ran else await self._run(announcement, out, gone)

    async def infer(
        self, announcement: Announcement, batch: np.ndarray, gone: Disconnected | None = None
    ) -> np.ndarray:
        """A model-ready input tensor ``[batch, ...]`` (checked against ``input_spec``) -> logits."""
        if len(batch) > self.limits.max_images:
            raise too_large(f"a batch of {len(batch)} images in one request; send at most {self.limits.max_images}")
        with self._admitted(len(batch)):
            if batch.dtype != self.input_spec.dtype:
                batch = batch.astype(self.input_spec.dtype)
            return await self._run(announcement, batch, gone)

    async def _run(self, announcement: Announcement, batch: np.ndarray, gone: Disconnected | None) -> np.ndarray:
        """Logits through the batcher; its errors become ``ServiceError`` kinds. A client that goes away
        while waiting takes its rows out of the queue."""
        if self.aborted:
            raise self._stopped()
        submitted = time.monotonic()
        timeout = self.limits.request_timeout_s
        work = asyncio.ensure_future(self.batcher.submit_many(list(batch), timeout, announcement))
        self._waiting.add(work)
        try:
            rows = await self._outcome(work, gone)
        except BatcherError as exc:
            raise self._batcher_error(exc, time.monotonic() - submitted, len(batch)) from None
        finally:
            self._waiting.discard(work)
        return np.stack(rows)

    def _batcher_error(self, exc: BatcherError, waited: float, rows: int) -> ServiceError:
        """The ``ServiceError`` of a batcher's error, for a request of ``rows`` that waited ``waited`` s."""
        if isinstance(exc, QueueFullError):
            return self._error(Kind.OVERLOADED, f"overloaded: {exc}; retry later", "queue_full")
        if isinstance(exc, NotAcceptingError):
            return shutting_down(str(exc), self.name)
        if isinstance(exc, RequestTimeoutError):
            for _ in range(rows):
                self._queue_seconds.observe(waited)
            return self._error(Kind.TIMEOUT, str(exc), "timeout")
        return self._error(Kind.INTERNAL, f"{exc}; the server logged the details", "inference_failed")

    async def _outcome(self, work: asyncio.Future[list[np.ndarray]], gone: Disconnected | None) -> list[np.ndarray]:
        racing: set[asyncio.Future[Any]] = {work}
        watcher = asyncio.ensure_future(gone()) if gone is not None else None
        if watcher is not None:
            racing.add(watcher)
        try:
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            if work.cancelled():  # not by us: this task is running, so the drain timeout cancelled it
                raise self._stopped()
            if not work.done() and watcher is not None and watcher.done() and watcher.exception() is None:
                raise client_gone(self.name)
            return await work
        finally:
            if watcher is not None:
                watcher.cancel()
            work.cancel()  # a no-op when done; otherwise the batcher skips the request's rows

    # --- shutdown -----------------------------------------------------------------------------------

    def abort(self) -> int:
        """The drain timeout passed: requests waiting for inference get 503 now (their rows leave the queue
        unrun), and so do later ones. Event loop only. Returns how many were waiting."""
        self.aborted = True
        for work in list(self._waiting):
            work.cancel()
        return len(self._waiting)

    def _stopped(self) -> ServiceError:
        message = "the server is shutting down and did not run this request; send it again (to another instance)"
        return shutting_down(message, self.name)

    def _error(self, kind: Kind, message: str, reason: str) -> ServiceError:
        return ServiceError(kind, message, model=self.name, reason=reason)
