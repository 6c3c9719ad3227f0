"""Overload and faults on a real socket (uvicorn in a thread, the model behind a gate the test holds):
bursts get fast 503s and bounded memory, one failing batch fails only its own requests, a timed-out
request is never run late, clients that leave while queued leave nothing behind."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .harness import GatedRun, classify, live_server, marked_png, metric, raw_request, request, wait_until


def test_a_burst_far_beyond_the_queue_gets_fast_503s_and_the_accepted_requests_succeed(tiny_onnx: Path) -> None:
    queue, batch = 4, 2
    with live_server(
        models=[str(tiny_onnx)], max_queue_size=queue, max_batch_size=batch, max_queue_delay_ms=0, max_images=queue
    ) as live:
        model = live.model("tiny")
        gated = GatedRun.stuck(model.batcher)  # nothing leaves the queue until the burst is answered
        peaks = {"active": 0, "depth": 0}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peaks["active"] = max(peaks["active"], model.active)
                peaks["depth"] = max(peaks["depth"], model.batcher.depth)
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        total = 200
        images = [marked_png(i % 250) for i in range(total)]
        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(classify, live.port, image) for image in images]
            # every request not admitted is answered while the model is still stuck
            wait_until(lambda: sum(f.done() for f in futures) + model.active == total, 30, "the rejections")
            rejected = [f.result() for f in futures if f.done()]
            gated.gate.set()
            replies = [f.result() for f in futures]
        sampling.set()
        sampler.join()

        accepted = [r for r in replies if r.status == 200]
        assert len(rejected) >= total - (queue + batch), "at most queue + batch requests are admitted"
        assert all(r.status == 503 for r in rejected), {r.status for r in rejected}
        assert len(accepted) == total - len(rejected) == len(gated.seen), "every admitted request ran and succeeded"
        for reply in rejected:
            assert reply.headers["retry-after"] == "1"
            assert reply.headers["content-type"] == "application/json"
            assert "overloaded" in reply.json()["error"]
        slowest = max(r.seconds for r in rejected)
        assert slowest < 5.0, f"a rejection took {slowest:.2f} s; they must not wait for the model"
        # memory stays bounded: admitted requests and queued images never passed their limits
        assert peaks["active"] <= queue + batch and peaks["depth"] <= queue, peaks

        # the burst is over: the server recovers at once
        assert classify(live.port, marked_png(1)).status == 200
        assert request(live.port, "GET", "/v2/health/ready").status == 200
        metrics = request(live.port, "GET", "/metrics").body.decode()
        counted = [
            metric(metrics, "stageformer_rejections_total", model="tiny", reason=r)
            for r in ("queue_full", "active_limit")
        ]
        assert sum(counted) == len(rejected), counted
        assert model.active == 0 and model.batcher.depth == 0


def test_an_inference_error_fails_only_the_requests_of_its_batch(tiny_onnx: Path) -> None:
    with live_server(models=[str(tiny_onnx)], max_batch_size=2, max_queue_delay_ms=0) as live:
        model = live.model("tiny")
        gated = GatedRun.stuck(model.batcher, poison=7)
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(classify, live.port, marked_png(9))  # runs alone, held at the gate
            wait_until(gated.entered.is_set, what="the first batch")
            later = {}
            for queued, marker in enumerate((7, 1, 2, 3), start=1):  # in this order: batches [7, 1] and [2, 3]
                later[marker] = pool.submit(classify, live.port, marked_png(marker))
                wait_until(lambda n=queued: model.batcher.depth == n, what="the queue")
            gated.gate.set()
            replies = {m: f.result() for m, f in later.items()}
            assert first.result().status == 200
        assert gated.batches == [[9], [7, 1], [2, 3]]
        for marker in (7, 1):  # the poisoned batch: both of its requests fail, with a JSON error
            assert replies[marker].status == 500
            assert "inference failed" in replies[marker].json()["error"]
            assert b"Traceback" not in replies[marker].body and b"injected" not in replies[marker].body
        assert replies[2].status == replies[3].status == 200  # the next batch is untouched
        assert classify(live.port, marked_png(4)).status == 200
        metrics = request(live.port, "GET", "/metrics").body.decode()
        assert metric(metrics, "stageformer_inference_failures_total", model="tiny") == 1


def test_a_timed_out_request_gets_504_and_is_never_run_late(tiny_onnx: Path) -> None:
    timeout = 0.5
    with live_server(
        models=[str(tiny_onnx)], max_batch_size=1, max_queue_delay_ms=0, request_timeout_s=timeout
    ) as live:
        model = live.model("tiny")
        gated = GatedRun.stuck(model.batcher)
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(classify, live.port, marked_png(1))
            wait_until(gated.entered.is_set, what="the first batch")
            queued = classify(live.port, marked_png(2))  # waits behind the stuck batch
            assert queued.status == 504, queued.body
            assert timeout <= queued.seconds < timeout + 2.0
            assert "no result within 0.5 s" in queued.json()["error"]
            gated.gate.set()
            assert running.result().status == 504  # it ran, but past its own timeout: nobody waits for it
        assert classify(live.port, marked_png(3)).status == 200
        assert gated.seen == [1, 3], "the request that timed out in the queue was never run"
        metrics = request(live.port, "GET", "/metrics").body.decode()
        assert metric(metrics, "stageformer_rejections_total", model="tiny", reason="timeout") == 2


def test_clients_that_disconnect_while_queued_leave_nothing_behind(tiny_onnx: Path) -> None:
    with live_server(models=[str(tiny_onnx)], max_batch_size=1, max_queue_delay_ms=0) as live:
        model = live.model("tiny")
        gated = GatedRun.stuck(model.batcher)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(classify, live.port, marked_png(1))
            wait_until(gated.entered.is_set, what="the first batch")
            sockets = [raw_request(live.port, marked_png(10 + i)) for i in range(5)]
            wait_until(lambda: model.batcher.depth == 5, what="five queued requests")
            for sock in sockets:
                sock.close()  # the clients give up while their requests wait
            gone = live.state.metrics.rejections.labels("tiny", "client_gone")
            wait_until(lambda: gone._value.get() == 5, what="the server to notice the disconnects")
            wait_until(lambda: model.active == 1, what="the disconnected requests to finish")
            gated.gate.set()
            assert running.result().status == 200
        assert classify(live.port, marked_png(2)).status == 200
        assert gated.seen == [1, 2], "no work was done for the clients that left"
        assert model.batcher.depth == 0 and model.active == 0
        metrics = request(live.port, "GET", "/metrics").body.decode()
        assert metric(metrics, "stageformer_requests_total", route="/v1/classify", status="499") == 5
