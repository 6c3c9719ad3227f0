"""Prometheus metrics of one app (its own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stageformer_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "stageformer_request_seconds", "total request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "stageformer_queue_wait_seconds", "time an image waited for its batch", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.preprocess_seconds = Histogram(
            "stageformer_preprocess_seconds", "decode + preprocess time per image", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "stageformer_inference_seconds", "time of one batched inference call", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "stageformer_batch_size", "images per inference call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("stageformer_queue_depth", "images waiting for a batch", ["model"], registry=r)
        self.rejections = Counter(
            "stageformer_rejections", "requests refused before inference", ["model", "reason"], registry=r
        )
        self.inference_failures = Counter(
            "stageformer_inference_failures", "failed inference calls", ["model"], registry=r
        )
        self.max_batch_size = Gauge(
            "stageformer_max_batch_size", "largest batch of one inference call (measured or set)", ["model"], registry=r
        )
        self.model_load_seconds = Gauge(
            "stageformer_model_load_seconds", "time to load and warm up a model", ["model"], registry=r
        )
