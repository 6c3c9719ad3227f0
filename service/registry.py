"""The models one server serves: each an ONNX Runtime model behind its own batcher, in a pipeline."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from .batcher import Batcher, BatchStats
from .errors import not_found
from .metrics import Metrics
from .pipeline import Limits, ModelPipeline
from .runtime import ModelLoadError, OnnxModel, choose_batch_size
from .settings import Settings

logger = logging.getLogger(__name__)

MAX_AUTO_LANES = 4  # each lane is one more copy of the model in memory
# Lanes are kept unless the full session is clearly faster (lanes at least this many times its images/s): in-process
# the two are often within the measurement's noise, while serving, lanes also overlap one batch's Python work with
# another's inference, and a lone request gets the full session either way.
LANES_WORTH = 0.95

DEMO_MODEL = Path(__file__).parent / "demo" / "digits.onnx"


def find_model_files(paths: list[str]) -> list[Path]:
    """ONNX files named directly, or found in folders (``*.onnx``, and Triton-style ``NAME/1/model.onnx``)."""
    files: list[Path] = []
    for raw in paths or [str(DEMO_MODEL)]:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(path.glob("*.onnx")) + sorted(path.glob("*/[0-9]*/model.onnx"))
            if not found:
                raise ModelLoadError(f"folder {raw!r} holds no .onnx files")
            files.extend(found)
        else:
            hint = " (the demo model ships with the package; reinstall it)" if not paths else ""
            raise ModelLoadError(f"model path {raw!r} does not exist{hint}")
    return files


class ModelRegistry:
    """The models being served, by name. ``models`` is replaced, never changed in place (``swap``), so a request
    that looked a model up keeps it whatever happens to the registry meanwhile. Event loop only, but for
    ``load``."""

    def __init__(self, models: dict[str, ModelPipeline], default: str) -> None:
        self.models = models
        self.default = default
        self.retired: set[ModelPipeline] = set()  # taken out of service, still finishing their requests

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics, decode_pool: Executor) -> ModelRegistry:
        """Load and warm up every model of ``settings``; ``ModelLoadError`` (nothing left running) when one
        cannot be served."""
        models: dict[str, ModelPipeline] = {}
        try:
            cls._load_into(models, settings, metrics, decode_pool)
            default = settings.default_model or next(iter(models))
            if default not in models:
                raise ModelLoadError(f"default model {default!r} is not among the loaded models: {', '.join(models)}")
        except BaseException:
            cls(models, "").close()  # stop the batchers of the models loaded before the failure
            raise
        return cls(models, default)

    @staticmethod
    def _load_into(
        models: dict[str, ModelPipeline], settings: Settings, metrics: Metrics, decode_pool: Executor
    ) -> None:
        for path in find_model_files(settings.models):
            model = load_model(path, settings, metrics, decode_pool)
            if model.name in models:
                model.batcher.close()
                raise ModelLoadError(
                    f"two models are named {model.name!r} ({models[model.name].info.path} and {path}); "
                    "rename one file or export it with --name"
                )
            models[model.name] = model

    def get(self, name: str | None) -> ModelPipeline | None:
        return self.models.get(name or self.default)

    def lookup(self, name: str | None) -> ModelPipeline:
        """The model called ``name`` (the default one for None); not found names the served ones."""
        model = self.get(name)
        if model is None:
            raise not_found(f"unknown model {name!r}; served models: {', '.join(sorted(self.models))}")
        return model

    def swap(self, name: str, model: ModelPipeline | None) -> ModelPipeline | None:
        """Serve ``model`` as ``name`` (None: serve nothing under it); returns the model it replaces."""
        models = dict(self.models)
        old = models.pop(name, None)
        if model is not None:
            models[name] = model
        self.models = models
        return old

    def _all(self) -> list[ModelPipeline]:
        return [*self.models.values(), *self.retired]

    @property
    def in_flight(self) -> int:
        """Requests in progress over all models, from their first byte to their answer."""
        return sum(m.arrivals for m in self._all())

    def abort(self) -> int:
        """Every model stops running requests (see ``ModelPipeline.abort``); how many were waiting."""
        return sum(m.abort() for m in self._all())

    def close(self, timeout_s: float | None = None) -> None:
        for model in self._all():
            model.batcher.close(timeout_s)


def load_model(path: Path, settings: Settings, metrics: Metrics, decode_pool: Executor) -> ModelPipeline:
    """One model file, loaded, its batch size chosen (``max_batch_size`` auto: by measurement), warmed up and
    put behind its own batcher. A Triton-style ``NAME/1/model.onnx`` is called NAME."""
    started = time.perf_counter()
    name = path.parent.parent.name if path.name == "model.onnx" and path.parent.name.isdigit() else None
    runtime = OnnxModel(path, device=settings.device, instances=settings.instances, threads=settings.threads,
                        trt_cache_dir=settings.trt_cache_dir, name=name)  # fmt: skip
    if settings.max_batch_size == "auto":
        throughput = runtime.measure_batch_sizes(settings.auto_batch_limit, settings.auto_batch_budget_s)
        size = choose_batch_size(throughput)
        rates = ", ".join(f"{b}: {r:.1f}" for b, r in throughput.items())
        logger.info("model %r: batch size %d chosen from images/s by batch size {%s}", runtime.info.name, size, rates)
    else:
        size = settings.max_batch_size
    runtime.set_max_batch_size(size)
    lanes = _add_lanes(runtime, settings, size)
    sizes = runtime.warm_up()
    batcher = Batcher(
        runtime.run,
        max_batch_size=size,
        max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
        max_queue_size=settings.max_queue_size,
        instances=lanes or settings.instances,
        solo_instance=lanes or None,  # with lanes, instance `lanes` is the full session (see OnnxModel.add_lanes)
        name=runtime.info.name,
        observer=_observer(metrics, runtime.info.name),
    )
    oversample = settings.decode_oversample if settings.decode == "fast" else None
    limits = Limits(settings.max_images, settings.max_image_pixels, settings.request_timeout_s, oversample)
    model = ModelPipeline(runtime, batcher, limits, metrics, decode_pool)
    seconds = time.perf_counter() - started
    metrics.model_load_seconds.labels(model.name).set(seconds)
    metrics.max_batch_size.labels(model.name).set(size)
    logger.info("loaded %r from %s in %.2f s (warmed up at batch sizes %s)", model.name, path, seconds, sizes)
    return model


def cpu_count() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _add_lanes(runtime: OnnxModel, settings: Settings, batch_size: int) -> int:
    """Give a CPU model its lanes (``--lanes``; auto: when measured worth it); how many it got."""
    cpus = cpu_count()
    if runtime.on_gpu or settings.lanes == 0:
        return 0
    if settings.lanes != "auto":
        runtime.add_lanes(settings.lanes, max(1, cpus // settings.lanes))
        return settings.lanes
    if settings.instances > 1 or settings.threads or cpus < 2:
        return 0  # the cores were split by hand, or there is nothing to split
    count = min(cpus, MAX_AUTO_LANES)
    runtime.add_lanes(count, cpus // count)
    alone, together = runtime.measure_lanes(batch_size, settings.auto_batch_budget_s / 2)
    runtime.lane_throughput = {"full_session": alone, "lanes": together}
    keep = together >= LANES_WORTH * alone
    logger.info("model %r: %s %d lanes (images/s at batch %d: full session %.1f, %d lanes side by side %.1f)",
                runtime.info.name, "serving with" if keep else "not worth", count, batch_size, alone, count,
                together)  # fmt: skip
    if not keep:
        runtime.drop_lanes()
        return 0
    return count


def _observer(metrics: Metrics, name: str) -> Callable[[BatchStats], None]:
    """Feeds one model's batch statistics into its metric children."""
    batch_size = metrics.batch_size.labels(name)
    inference = metrics.inference_seconds.labels(name)
    queue = metrics.queue_seconds.labels(name)
    failures = metrics.inference_failures.labels(name)

    def observe(stats: BatchStats) -> None:
        batch_size.observe(stats.size)
        inference.observe(stats.run_seconds)
        for wait in stats.queue_waits:
            queue.observe(wait)
        if stats.failed:
            failures.inc()

    return observe
