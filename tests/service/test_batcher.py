"""The batcher's contract, tested against a plain function and plain asyncio: no HTTP, no ONNX."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from service.batcher import (
    Batcher,
    BatchFailedError,
    BatchStats,
    NotAcceptingError,
    QueueFullError,
    RequestTimeoutError,
)


class Recorder:
    """A fake model: doubles its input, records batch sizes, can be slowed down or made to fail."""

    def __init__(self, delay_s: float = 0.0, fail_when: int | None = None) -> None:
        self.delay_s = delay_s
        self.fail_when = fail_when  # fail any batch containing this value
        self.sizes: list[int] = []
        self.seen: list[float] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once a worker has taken a batch

    def __call__(self, batch: np.ndarray, instance: int) -> np.ndarray:
        self.entered.set()
        self.gate.wait()
        self.sizes.append(len(batch))
        self.seen.extend(batch[:, 0].tolist())
        time.sleep(self.delay_s)
        if self.fail_when is not None and self.fail_when in batch[:, 0]:
            raise RuntimeError("injected failure")
        return batch * 2


def make(run: Recorder, **kwargs: object) -> Batcher:
    options = {"max_batch_size": 8, "max_queue_delay_s": 0.01, "max_queue_size": 100, **kwargs}
    return Batcher(run, **options)  # type: ignore[arg-type]


def item(value: float) -> np.ndarray:
    return np.full((3,), value, dtype=np.float32)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Wait for an observable state of the batcher (instead of sleeping and hoping)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def announced(batcher: Batcher, values: list[float], timeout_s: float = 5.0) -> list[np.ndarray]:
    """Callers that announced themselves first (as the server does while it reads and decodes), then submit."""
    for _ in values:
        batcher.expect()
    return await asyncio.gather(*(batcher.submit(item(v), timeout_s, expected=True) for v in values))


async def test_every_caller_gets_its_own_row() -> None:
    run = Recorder(delay_s=0.002)
    batcher = make(run)
    results = await asyncio.gather(*(batcher.submit(item(i), 5.0) for i in range(50)))
    for i, row in enumerate(results):
        assert np.array_equal(row, item(2 * i))
    assert max(run.sizes) > 1  # concurrent callers were batched
    assert max(run.sizes) <= 8
    batcher.close()


async def test_full_batch_goes_at_once() -> None:
    run = Recorder()
    batcher = make(run, max_batch_size=4, max_queue_delay_s=1.0)
    started = time.monotonic()
    await announced(batcher, [0, 1, 2, 3])
    assert time.monotonic() - started < 0.8  # full: no waiting for the delay
    assert run.sizes == [4]
    batcher.close()


async def test_a_lone_request_never_waits_for_company() -> None:
    run = Recorder()
    batcher = make(run, max_batch_size=4, max_queue_delay_s=1.0)
    started = time.monotonic()
    await batcher.submit(item(9), 5.0)
    assert time.monotonic() - started < 0.5  # nobody is on the way: the batch goes at once
    await announced(batcher, [8])  # announced and already here: nobody else is on the way
    assert time.monotonic() - started < 0.9
    assert run.sizes == [1, 1]
    batcher.close()


async def test_a_batch_waits_for_announced_requests_up_to_the_delay() -> None:
    run = Recorder()
    batcher = make(run, max_batch_size=4, max_queue_delay_s=1.0)
    batcher.expect()  # one request is on its way (being read or decoded) and never comes
    started = time.monotonic()
    await batcher.submit(item(1), 5.0)
    assert time.monotonic() - started >= 0.98  # waited for it until the delay ended
    batcher.withdraw()

    batcher.expect()  # one on its way that does come, 0.2 s later: both go in one batch, long before the delay
    started = time.monotonic()
    early = asyncio.ensure_future(batcher.submit(item(2), 5.0))
    await asyncio.sleep(0.2)
    await batcher.submit(item(3), 5.0, expected=True)
    await early
    assert 0.19 < time.monotonic() - started < 0.9
    assert run.sizes == [1, 2]

    batcher.expect()  # one on its way that gives up: the waiting batch goes when it withdraws
    started = time.monotonic()
    early = asyncio.ensure_future(batcher.submit(item(4), 5.0))
    await asyncio.sleep(0.2)
    batcher.withdraw()
    await early
    assert 0.19 < time.monotonic() - started < 0.9
    assert run.sizes == [1, 2, 1] and batcher.expected == 0
    batcher.close()


async def test_queue_limit_rejects_at_once_without_queueing() -> None:
    run = Recorder()
    run.gate.clear()  # the model is stuck: nothing leaves the queue
    batcher = make(run, max_batch_size=2, max_queue_size=4, max_queue_delay_s=0.0)
    first = asyncio.ensure_future(batcher.submit_many([item(1), item(2)], 5.0))
    assert await asyncio.to_thread(run.entered.wait, 5.0)  # taken by the (blocked) worker
    waiting = asyncio.ensure_future(batcher.submit_many([item(3), item(4), item(5), item(6)], 5.0))
    await until(lambda: batcher.depth == 4, "the four items to queue")
    started = time.monotonic()
    with pytest.raises(QueueFullError, match="has 4 images waiting \\(limit 4\\)"):
        await batcher.submit(item(7), 5.0)
    assert time.monotonic() - started < 0.5  # refused at once, not after the 5 s timeout
    assert batcher.depth == 4
    run.gate.set()
    await first
    await waiting
    assert 7.0 not in run.seen
    batcher.close()


async def test_timed_out_items_are_never_run_late() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = make(run, max_batch_size=1, max_queue_delay_s=0.0)
    blocker = asyncio.ensure_future(batcher.submit(item(1), 5.0))
    assert await asyncio.to_thread(run.entered.wait, 5.0)
    with pytest.raises(RequestTimeoutError):
        await batcher.submit(item(2), 0.1)
    run.gate.set()
    await blocker
    await batcher.submit(item(3), 5.0)
    assert run.seen == [1.0, 3.0]  # item 2 timed out while waiting and was skipped
    batcher.close()


async def test_cancelled_callers_leave_nothing_stuck() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = make(run, max_batch_size=1, max_queue_delay_s=0.0)
    blocker = asyncio.ensure_future(batcher.submit(item(1), 5.0))
    assert await asyncio.to_thread(run.entered.wait, 5.0)
    gone = [asyncio.ensure_future(batcher.submit(item(10 + i), 5.0)) for i in range(5)]
    await until(lambda: batcher.depth == 5, "the five items to queue")
    for task in gone:
        task.cancel()  # clients that disconnected while queued
    await asyncio.gather(*gone, return_exceptions=True)  # let the cancellations land
    run.gate.set()
    await blocker
    assert np.array_equal(await batcher.submit(item(4), 5.0), item(8))
    assert run.seen == [1.0, 4.0]
    assert batcher.depth == 0
    batcher.close()


async def test_a_failing_batch_fails_only_its_own_items() -> None:
    run = Recorder(fail_when=13)
    stats: list[BatchStats] = []
    batcher = make(run, max_batch_size=4, max_queue_delay_s=0.05, observer=stats.append)
    for _ in range(4):
        batcher.expect()
    bad = await asyncio.gather(
        *(batcher.submit(item(v), 5.0, expected=True) for v in (11, 12, 13, 14)), return_exceptions=True
    )
    assert all(isinstance(r, BatchFailedError) for r in bad)
    good = await announced(batcher, [21, 22])
    assert [float(r[0]) for r in good] == [42.0, 44.0]
    assert [s.failed for s in stats] == [True, False]
    assert stats[1].size == 2 and len(stats[1].queue_waits) == 2
    batcher.close()


async def test_close_drains_what_is_queued_then_refuses() -> None:
    run = Recorder(delay_s=0.02)
    batcher = make(run, max_batch_size=2, max_queue_delay_s=0.0, instances=2)
    pending = [asyncio.ensure_future(batcher.submit(item(i), 5.0)) for i in range(10)]
    await asyncio.sleep(0)  # one loop iteration: every submit task has queued its item (no timing involved)
    await asyncio.get_running_loop().run_in_executor(None, batcher.close)
    results = await asyncio.gather(*pending)
    assert sorted(float(r[0]) for r in results) == [2.0 * i for i in range(10)]
    with pytest.raises(NotAcceptingError):
        await batcher.submit(item(1), 1.0)


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        Batcher(Recorder(), max_batch_size=0, max_queue_delay_s=0.0, max_queue_size=1)
