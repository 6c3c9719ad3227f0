"""The batcher's contract, tested against a plain function and plain asyncio: no HTTP, no ONNX."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from service.batcher import (
    Announcement,
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
        self.ran_on: dict[float, int] = {}  # the instance each value's batch ran on
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once a worker has taken a batch
        self.calls = 0  # batches taken so far (counted before the gate)

    def __call__(self, batch: np.ndarray, instance: int) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        self.gate.wait()
        self.sizes.append(len(batch))
        self.ran_on.update((value, instance) for value in batch[:, 0].tolist())
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
    pairs = [(value, batcher.expect()) for value in values]
    return await asyncio.gather(*(batcher.submit(item(value), timeout_s, a) for value, a in pairs))


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
    never = batcher.expect()  # one request is on its way (being read or decoded) and never comes
    started = time.monotonic()
    await batcher.submit(item(1), 5.0)
    assert time.monotonic() - started >= 0.98  # waited for it until the delay ended
    batcher.withdraw(never)
    batcher.withdraw(never)  # ended already: nothing changes
    assert batcher.expected == 0

    coming = batcher.expect()  # one on its way that does come, 0.2 s later: both go in one batch, long before the delay
    started = time.monotonic()
    early = asyncio.ensure_future(batcher.submit(item(2), 5.0))
    await asyncio.sleep(0.2)
    await batcher.submit(item(3), 5.0, coming)
    batcher.withdraw(coming)  # it submitted: withdrawing it afterwards (as a request's end does) changes nothing
    await early
    assert 0.19 < time.monotonic() - started < 0.9
    assert run.sizes == [1, 2]

    giving_up = batcher.expect()  # one on its way that gives up: the waiting batch goes when it withdraws
    started = time.monotonic()
    early = asyncio.ensure_future(batcher.submit(item(4), 5.0))
    await asyncio.sleep(0.2)
    batcher.withdraw(giving_up)
    await early
    assert 0.19 < time.monotonic() - started < 0.9
    assert run.sizes == [1, 2, 1] and batcher.expected == 0
    batcher.close()


async def test_a_batch_alone_runs_on_the_solo_instance_and_others_side_by_side_on_their_own() -> None:
    run = Recorder()
    batcher = make(run, max_batch_size=1, max_queue_delay_s=0.01, instances=2, solo_instance=2)
    await batcher.submit(item(1), 5.0)  # nothing else running, queued or on its way
    assert run.ran_on == {1: 2}

    run.gate.clear()  # the first batch holds its worker; the next one comes while it runs
    first = asyncio.ensure_future(batcher.submit(item(2), 5.0))
    await until(lambda: run.calls == 2, "the first batch to start")
    second = asyncio.ensure_future(batcher.submit(item(3), 5.0))
    await until(lambda: run.calls == 3, "the second batch to be taken by the other worker")
    run.gate.set()
    assert [float(r[0]) for r in await asyncio.gather(first, second)] == [4.0, 6.0]
    assert run.ran_on[2] == 2 and run.ran_on[3] in (0, 1)  # alone: solo; beside a running one: its own lane

    other = batcher.expect()  # another request is on its way (and never comes): this batch does not run alone
    await batcher.submit(item(4), 5.0)
    batcher.withdraw(other)
    assert run.ran_on[4] in (0, 1)
    batcher.close()


async def one_held_beside_a_running_batch(
    batcher: Batcher, run: Recorder, running: float, held: float
) -> tuple[asyncio.Future[np.ndarray], asyncio.Future[np.ndarray], Announcement]:
    """A batch of ``running`` held in its lane while another request is announced, and ``held`` queued beside it
    and not started (lanes; max batch above 1): both callers' futures and the open announcement."""
    run.gate.clear()
    calls = run.calls
    coming = batcher.expect()
    first = asyncio.ensure_future(batcher.submit(item(running), 5.0))
    await until(lambda: run.calls == calls + 1, "the next batch to start")
    second = asyncio.ensure_future(batcher.submit(item(held), 5.0))
    await asyncio.sleep(0.1)
    assert run.calls == calls + 1  # held back while another request is on its way
    return first, second, coming


async def test_beside_a_running_batch_a_lane_takes_only_a_full_batch_or_one_nobody_will_join() -> None:
    run = Recorder()
    batcher = make(run, max_batch_size=3, max_queue_delay_s=0.0, instances=2, solo_instance=2)
    run.gate.clear()
    coming = batcher.expect()  # the running batch's company is still on its way
    first = asyncio.ensure_future(batcher.submit(item(1), 5.0))
    await until(lambda: run.calls == 1, "the first batch to start")
    waiting = [asyncio.ensure_future(batcher.submit(item(v), 5.0)) for v in (2, 3)]
    await asyncio.sleep(0.1)
    assert run.calls == 1 and batcher.depth == 2  # two of three, more coming: held back for the running lane
    third = asyncio.ensure_future(batcher.submit(item(4), 5.0, coming))
    await until(lambda: run.calls == 2, "a full batch to start beside the running one")
    run.gate.set()
    await asyncio.gather(first, *waiting, third)
    assert sorted(run.sizes) == [1, 3] and run.ran_on[2] in (0, 1)  # both passed the gate together: either order

    first, lone, coming = await one_held_beside_a_running_batch(batcher, run, 5, 6)
    batcher.withdraw(coming)  # it will not come: nobody will join the waiting one
    await until(lambda: run.calls == 4, "the waiting batch to start beside the running one")
    run.gate.set()
    await asyncio.gather(first, lone)

    first, later, coming = await one_held_beside_a_running_batch(batcher, run, 7, 8)
    run.gate.set()  # the running batch ends: the held one starts after it
    await asyncio.gather(first, later)
    assert run.calls == 6
    batcher.withdraw(coming)

    plain = make(Recorder(), max_batch_size=3, instances=2)  # without lanes, instances take whatever waits
    plain_run = plain._run
    assert isinstance(plain_run, Recorder)
    plain_run.gate.clear()
    other = plain.expect()
    first = asyncio.ensure_future(plain.submit(item(1), 5.0))
    await until(lambda: plain_run.calls == 1, "the first batch to start")
    second = asyncio.ensure_future(plain.submit(item(2), 5.0))
    await until(lambda: plain_run.calls == 2, "the other instance to take the waiting item")
    plain_run.gate.set()
    await asyncio.gather(first, second)
    plain.withdraw(other)
    batcher.close()
    plain.close()


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
    bad = await asyncio.gather(*(announced(batcher, [v]) for v in (11, 12, 13, 14)), return_exceptions=True)
    assert all(isinstance(r, BatchFailedError) for r in bad)
    good = await announced(batcher, [21, 22])
    assert [float(r[0]) for r in good] == [42.0, 44.0]
    assert [s.failed for s in stats] == [True, False]
    assert stats[1].size == 2 and len(stats[1].queue_waits) == 2
    batcher.close()


async def test_a_lone_request_runs_in_its_own_thread_only_when_nothing_else_is_going_on() -> None:
    run = Recorder()
    stats: list[BatchStats] = []
    batcher = make(run, instances=2, solo_instance=2, observer=stats.append)
    mine = batcher.expect()
    out = batcher.run_alone(np.stack([item(1)]), mine)
    assert out is not None and np.array_equal(out, np.stack([item(2)])) and run.ran_on == {1: 2}
    assert not mine.open and batcher.expected == 0 and stats[-1].size == 1

    mine, other = batcher.expect(), batcher.expect()  # another request is on its way: queue instead
    assert batcher.run_alone(np.stack([item(3)]), mine) is None and mine.open and batcher.expected == 2
    batcher.withdraw(other)
    run.gate.clear()  # a batch runs: queue instead
    running = asyncio.ensure_future(batcher.submit(item(4), 5.0))
    await until(lambda: run.calls == 2, "a batch to run")
    assert batcher.run_alone(np.stack([item(5)]), mine) is None and mine.open
    run.gate.set()
    await running
    assert batcher.run_alone(np.stack([item(6)]), mine) is not None and batcher.expected == 0

    bad = Recorder(fail_when=7)  # its errors are submit's
    batcher2 = make(bad)
    with pytest.raises(BatchFailedError):
        batcher2.run_alone(np.stack([item(7)]))
    batcher2.close()
    batcher.close()
    assert batcher.run_alone(np.stack([item(8)])) is None  # closed: the queue says so (NotAcceptingError)


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
