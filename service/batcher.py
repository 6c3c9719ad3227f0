"""Dynamic batching: concurrent requests for one model become one inference call.

Contract (what callers may rely on):
- ``submit`` returns exactly the row of the batch output that belongs to its own item.
- A batch closes when it holds ``max_batch_size`` items, or ``max_queue_delay`` after its first item
  was queued, whichever comes first; a full batch goes at once. It also goes at once when no request
  is on its way: callers announce a request that will submit soon (``expect``: its body is being read or
  decoded) and the batch waits for more only while one is announced. Announcements start and end under
  the batcher's lock, so any thread may end one. A lone client never waits.
- More than ``max_queue_size`` waiting items: ``QueueFullError`` at once, nothing is queued.
- An item whose timeout passes while it waits is never run: its caller gets ``RequestTimeoutError``.
  An item whose caller went away (its task cancelled) is skipped.
- An exception inside one inference call fails only that batch's items (``BatchFailedError``).
- ``close`` stops taking items, lets the workers finish everything already queued, then joins them.
- ``run_alone`` runs a batch at once in the caller's thread when it would run alone anyway (nothing
  running, queued or on its way but this request): the lone request skips the hand-off to a worker.

Inference runs in dedicated threads (one per session instance), never on the event loop. With a
``solo_instance``, a batch that runs alone (no other batch running, nothing else queued or on its way)
runs on that instance instead of its worker's own: one wide session for a lone request, narrow ones side
by side under load (``OnnxModel.add_lanes``). A batch starts beside a running one only when it is full or no
other request is on its way, so the lanes share out a backlog without splitting a trickle into small batches
that would take the cores the requests are read and decoded on. This module
knows nothing of HTTP or ONNX Runtime: ``run`` is any function from a stacked batch to an array
whose first axis is the batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray, int], np.ndarray]  # (batch, instance index) -> outputs


class BatcherError(Exception):
    """Base of the batcher's errors."""


class QueueFullError(BatcherError):
    """Too many items are waiting; try again later."""


class RequestTimeoutError(BatcherError):
    """The item waited longer than its timeout and was not run."""


class BatchFailedError(BatcherError):
    """The inference call of the item's batch raised."""


class NotAcceptingError(BatcherError):
    """The batcher is closing (the server is shutting down)."""


@dataclass(frozen=True)
class BatchStats:
    """What one inference call did, for metrics."""

    size: int  # items in the batch
    queue_waits: tuple[float, ...]  # seconds each item waited before its batch started
    run_seconds: float  # duration of the inference call
    failed: bool


class Announcement:
    """A request announced with ``Batcher.expect``, until it submits, runs or is withdrawn (``open``)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


@dataclass
class _Pending:
    item: np.ndarray
    future: concurrent.futures.Future[np.ndarray]
    enqueued: float  # time.monotonic() when queued
    deadline: float  # time.monotonic() after which it must not run


def _retrieve(future: asyncio.Future[list[np.ndarray]]) -> None:
    """Mark an abandoned gather's outcome as seen, so asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


class Batcher:
    """Collects items from many callers into batches for ``run``; see the module docstring."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        instances: int = 1,
        solo_instance: int | None = None,
        name: str = "model",
        observer: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or instances < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size, max_queue_size and instances must be >= 1, the delay >= 0")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.solo_instance = solo_instance
        self.name = name
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._expected = 0  # requests announced by ``expect`` that have not submitted or withdrawn yet
        self._running = 0  # batches being run
        self._alone_on: int | None = None  # the instance a ``run_alone`` call is running on
        self._cond = threading.Condition()
        self._accepting = True
        self._threads = [
            threading.Thread(target=self._worker, args=(i,), name=f"infer-{name}-{i}", daemon=True)
            for i in range(instances)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._queue)

    # --- callers' side (event loop) -------------------------------------------------------------

    def expect(self) -> Announcement:
        """Announce a request that will submit soon: a batch being formed waits for it (up to the delay). The
        announcement ends when the request submits or runs with it, or when it is withdrawn."""
        with self._cond:
            self._expected += 1
        return Announcement()

    def withdraw(self, announcement: Announcement) -> None:
        """End an announcement whose request will not submit (it failed before it was ready, or is done); a
        no-op when it has ended already."""
        with self._cond:
            if announcement.open:
                self._end(announcement)
                self._cond.notify_all()

    def _end(self, announcement: Announcement | None) -> int:
        """End ``announcement`` if open (lock held); 1 if it was, else 0."""
        if announcement is None or not announcement.open:
            return 0
        announcement.open = False
        self._expected -= 1
        return 1

    @property
    def expected(self) -> int:
        """Announced requests that have not submitted or withdrawn yet."""
        return self._expected

    async def submit(self, item: np.ndarray, timeout_s: float, announcement: Announcement | None = None) -> np.ndarray:
        """Queue one item and wait for its output row."""
        return (await self.submit_many([item], timeout_s, announcement))[0]

    async def submit_many(
        self, items: Sequence[np.ndarray], timeout_s: float, announcement: Announcement | None = None
    ) -> list[np.ndarray]:
        """Queue several items at once (all or none) and wait for all their output rows, in order.
        ``announcement``: this request's, from ``expect``; it ends here, whatever the outcome."""
        now = time.monotonic()
        pending = [_Pending(item, concurrent.futures.Future(), now, now + timeout_s) for item in items]
        with self._cond:
            if self._end(announcement):
                self._cond.notify_all()
            if not self._accepting:
                raise NotAcceptingError(f"model {self.name!r} is shutting down")
            if len(self._queue) + len(pending) > self.max_queue_size:
                raise QueueFullError(
                    f"model {self.name!r} has {len(self._queue)} images waiting (limit {self.max_queue_size})"
                )
            self._queue.extend(pending)
            self._cond.notify_all()
        gathered = asyncio.gather(*(asyncio.wrap_future(p.future) for p in pending))
        try:
            done = await asyncio.wait_for(gathered, timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(f"no result within {timeout_s:g} s; the server is too busy") from None
        finally:  # on timeout or when the caller goes away, nothing of this request runs any more
            for p in pending:
                p.future.cancel()
            gathered.add_done_callback(_retrieve)
        return list(done)

    def run_alone(self, batch: np.ndarray, announcement: Announcement | None = None) -> np.ndarray | None:
        """Run ``batch`` now, in this thread, when no batch runs, none waits and no request is on its way but
        this one (``announcement``: its own, which ends here when it runs); the outputs, or None when it must
        go through the queue instead (``submit_many``). Errors as ``submit_many``'s. For a thread that already
        holds the request (the one that decoded it): a lone request then crosses no thread to be run."""
        with self._cond:
            own = 1 if announcement is not None and announcement.open else 0
            if not self._accepting or not self._idle_but(own):
                return None
            self._running += 1
            self._end(announcement)
            instance = self._alone_on = self.solo_instance if self.solo_instance is not None else 0
        pending = [_Pending(row, concurrent.futures.Future(), time.monotonic(), float("inf")) for row in batch]
        for p in pending:
            p.future.set_running_or_notify_cancel()
        try:
            self._execute(pending, instance)
        finally:
            with self._cond:  # the worker of that instance (without lanes) may take batches again
                self._alone_on = None
                self._cond.notify_all()
        return np.stack([p.future.result() for p in pending])

    # --- workers' side (threads) ----------------------------------------------------------------

    def _next_batch(self, instance: int) -> tuple[list[_Pending], int] | None:
        """Block until a batch is ready: it and the instance to run it on; None when closed and drained."""
        with self._cond:
            while not self._queue or self._alone_on == instance or self._holds_back():
                if not self._queue and not self._accepting:
                    return None
                self._cond.wait()
            closes_at = self._queue[0].enqueued + self.max_queue_delay_s
            while len(self._queue) < self.max_batch_size and self._accepting and self._expected > 0:
                remaining = closes_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Pending] = []
            now = time.monotonic()
            while self._queue and len(batch) < self.max_batch_size:
                p = self._queue.popleft()
                if not p.future.set_running_or_notify_cancel():
                    continue  # its caller went away
                if now > p.deadline:
                    p.future.set_exception(RequestTimeoutError("the request waited longer than its timeout"))
                    continue
                batch.append(p)
            alone = self._idle_but(0)  # the batch just taken is all there is
            if batch:
                self._running += 1
            return batch, self.solo_instance if alone and self.solo_instance is not None else instance

    def _holds_back(self) -> bool:
        """With lanes, a batch starts beside a running one only when it is full or no other request is on its way
        (lock held). Under a steady trickle one lane then takes ever larger batches while the other cores read and
        decode requests; a backlog of full batches, or a request nobody will join, opens the other lanes."""
        return (
            self.solo_instance is not None
            and self._accepting
            and self._running > 0
            and self._expected > 0
            and len(self._queue) < self.max_batch_size
        )

    def _idle_but(self, announced: int) -> bool:
        """Nothing runs, nothing waits and no request is on its way but ``announced`` ones (lock held): a batch
        taken now runs alone."""
        return self._running == 0 and not self._queue and self._expected == announced

    def _worker(self, instance: int) -> None:
        while (taken := self._next_batch(instance)) is not None:
            batch, runs_on = taken
            if batch:
                self._execute(batch, runs_on)

    def _execute(self, batch: list[_Pending], instance: int) -> None:
        started = time.monotonic()
        waits = tuple(started - p.enqueued for p in batch)
        outputs: np.ndarray | None = None
        error: Exception | None = None
        try:
            outputs = self._run(np.stack([p.item for p in batch]), instance)
            if len(outputs) != len(batch):
                raise RuntimeError(f"inference returned {len(outputs)} rows for a batch of {len(batch)}")
        except Exception as exc:  # one failing batch fails only its own items
            error = exc
            logger.exception("inference failed for a batch of %d on model %r", len(batch), self.name)
        with self._cond:  # done before anyone sees its result: a caller holding one finds nothing running
            self._running -= 1
            self._cond.notify_all()  # a worker held back beside this batch may start
        # Record the batch before anyone sees its result, so a caller holding a result also sees it counted.
        if self._observer is not None:
            try:
                self._observer(BatchStats(len(batch), waits, time.monotonic() - started, error is not None))
            except Exception:
                logger.exception("the batch observer failed for model %r", self.name)
        if error is not None or outputs is None:
            name = type(error).__name__
            for p in batch:
                p.future.set_exception(BatchFailedError(f"inference failed: {name}"))
        else:
            for i, p in enumerate(batch):
                p.future.set_result(outputs[i])

    def close(self, timeout_s: float | None = None) -> None:
        """Stop accepting; finish what is queued and running; join the workers."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)
