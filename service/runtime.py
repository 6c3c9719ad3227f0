"""ONNX Runtime sessions for one exported model: provider choice, batch-size buckets, IO binding, warm-up.

Everything the server needs to know about a model is read from the ONNX file itself (its
``metadata_props``, written by ``stageformer export``): name, labels, preprocessing, input format.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from stageformer.core.formats import (
    INPUT_FORMAT_KEY,
    LABELS_KEY,
    NAME_KEY,
    NORMALIZED_INPUT,
    PREPROCESS_KEY,
    RAW_INPUT,
)
from stageformer.core.naming import is_model_name
from stageformer.core.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model file cannot be served; the message says why."""


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows about a model, all from the ONNX file."""

    name: str
    path: Path
    labels: tuple[str, ...]
    preprocess: PreprocessConfig
    input_name: str
    input_format: str  # "raw": uint8 [B, H, W, 3]; "normalized": float32 [B, 3, H, W]
    output_name: str
    metadata: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_dtype(self) -> type[np.generic]:
        return np.uint8 if self.input_format == "raw" else np.float32

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one input sample, without the batch axis."""
        s = self.preprocess.image_size
        return (s, s, 3) if self.input_format == "raw" else (3, s, s)


def read_model_info(path: Path, session: ort.InferenceSession, name: str | None = None) -> ModelInfo:
    meta = dict(session.get_modelmeta().custom_metadata_map)
    try:
        preprocess = PreprocessConfig.from_json(meta[PREPROCESS_KEY])
        labels = json.loads(meta[LABELS_KEY])
    except KeyError as exc:
        raise ModelLoadError(
            f"{path}: metadata {exc.args[0]!r} is missing; export the model with `stageformer export`"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: invalid metadata: {exc}") from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(f"{path}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
    input_format = meta.get(INPUT_FORMAT_KEY, RAW_INPUT if inputs[0].type == "tensor(uint8)" else NORMALIZED_INPUT)
    model_name = name or meta.get(NAME_KEY) or path.stem
    if not is_model_name(model_name):
        raise ModelLoadError(
            f"{path}: {model_name!r} cannot name a model (a URL segment): use at most 128 letters, digits, '_', '.' "
            "and '-', not '.' or '-' first; rename the file or export it with --name"
        )
    info = ModelInfo(
        model_name, path, tuple(str(x) for x in labels), preprocess, inputs[0].name, input_format, outputs[0].name, meta
    )
    expected = ["tensor(uint8)" if input_format == "raw" else "tensor(float)"]
    if inputs[0].type not in expected:
        raise ModelLoadError(f"{path}: input type {inputs[0].type} does not fit input_format {input_format!r}")
    return info


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a GPU session runs: powers of two up to the maximum, and the maximum itself."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit``."""
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def choose_batch_size(throughput: dict[int, float], tolerance: float = 0.05) -> int:
    """The smallest batch size whose images/s is within ``tolerance`` of the best measured: as fast as the
    fastest, with the least latency. Never one slower per image than batch 1 (if batch 1 is within the
    tolerance, it is chosen)."""
    best = max(throughput.values())
    return min(size for size, rate in throughput.items() if rate >= (1.0 - tolerance) * best)


def _load_cuda_libraries() -> None:
    """onnxruntime-gpu from PyPI may find CUDA and cuDNN only in NVIDIA's pip packages (nvidia-cuda-runtime,
    nvidia-cudnn, ...), which the dynamic loader does not search: ``preload_dlls`` loads them from there, or
    from the system's paths (as in NVIDIA's CUDA images). Whether CUDA then really starts is checked after."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload(directory="")
    except Exception as exc:  # a missing library shows below as CUDA not starting; say why here
        logger.warning("could not preload the CUDA libraries: %s", exc)


def _cuda_works(providers: list[str]) -> bool:
    return bool(providers) and providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class OnnxModel:
    """One model: ``instances`` ONNX Runtime sessions on the chosen device.

    ``device``: ``cpu``; ``cuda`` (error at start-up when CUDA does not really start); ``tensorrt`` (engine
    cache in ``trt_cache_dir``); ``auto`` (CUDA when it really starts, else CPU). On GPUs the batch is
    padded up to a bucket size so that few shapes are ever seen (cuDNN's algorithm search runs once per
    bucket, at warm-up), inputs and outputs go through IO binding.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        instances: int = 1,
        threads: int = 0,
        max_batch_size: int = 1,
        trt_cache_dir: str = ".trt_cache",
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"model file {str(self.path)!r} does not exist")
        self.max_batch_size = max_batch_size
        self._providers_list = self._providers(device, trt_cache_dir, max_batch_size)
        self.sessions = [self._new_session(threads) for _ in range(instances)]
        self.lanes: list[ort.InferenceSession] = []  # see add_lanes
        active = self.sessions[0].get_providers()
        if device in ("cuda", "tensorrt") and not _cuda_works(active):
            raise ModelLoadError(
                f"--device {device} was asked for, but ONNX Runtime could not start it (active: {active}); "
                "check the NVIDIA driver and that onnxruntime-gpu (not onnxruntime) is installed, or use --device cpu"
            )
        if device == "tensorrt" and active[0] != "TensorrtExecutionProvider":
            raise ModelLoadError(f"--device tensorrt was asked for, but TensorRT did not start (active: {active})")
        self.provider = active[0]
        self.on_gpu = _cuda_works(active)
        self.info = read_model_info(self.path, self.sessions[0], name)
        self.buckets = batch_buckets(max_batch_size) if self.on_gpu else []
        self.batch_throughput: dict[int, float] = {}  # images/s per batch size, when measured
        self.lane_throughput: dict[str, float] = {}  # images/s of the full session and of the lanes, when measured
        logger.info("model %r runs on %s (%d instance(s))", self.info.name, self.provider, instances)

    def _new_session(self, threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # ORT's own fallback warnings are replaced by one clear line below
        # ONNX Runtime's pool threads spin for a long while after each parallel section by default, holding
        # cores that this process's decoding and HTTP threads need. A 50 µs spin still bridges the gaps
        # between the operators of one run (latency as with the default), then the threads sleep: on 2
        # cores this used the least CPU per call of default, no spinning and 500 µs (bench/).
        options.add_session_config_entry("session.intra_op.spin_duration_us", "50")
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=self._providers_list)
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            raise ModelLoadError(f"{self.path}: ONNX Runtime cannot load it: {exc}") from exc

    # --- lanes ----------------------------------------------------------------------------------------

    def add_lanes(self, count: int, threads: int) -> None:
        """``count`` more sessions with ``threads`` intra-op threads each, for batches that run side by side
        while requests queue: instances ``0..count-1`` of ``run`` are the lanes, instance ``count`` is the
        first session (for a batch that runs alone, using every core). On a few CPU cores several narrow
        sessions side by side get more images/s than one wide one, whose operators do not all split."""
        self.lanes = [self._new_session(threads) for _ in range(count)]

    def drop_lanes(self) -> None:
        self.lanes = []

    def measure_lanes(self, batch_size: int, budget_s: float) -> tuple[float, float]:
        """Images/s at ``batch_size`` of the first session alone, and of every lane at once (one thread
        driving each), in three rounds that alternate between the two within about ``budget_s``; medians."""
        batch = self._lanes_ready(batch_size)
        stretch = budget_s / 6
        alone, together = [], []
        for _ in range(3):
            alone.append(self._rate([self.sessions[0]], batch, stretch))
            together.append(self._rate(self.lanes, batch, stretch))
        return statistics.median(alone), statistics.median(together)

    def lanes_rate(self, batch_size: int, seconds: float, rounds: int = 3) -> float:
        """Images/s of every lane at once at ``batch_size`` (one thread driving each): the median of ``rounds``
        stretches of about ``seconds`` each."""
        batch = self._lanes_ready(batch_size)
        return statistics.median(self._rate(self.lanes, batch, seconds) for _ in range(rounds))

    def _lanes_ready(self, batch_size: int) -> np.ndarray:
        """A blank batch of ``batch_size``, every lane having run it once (the first run of a session allocates)."""
        if not self.lanes:
            raise ValueError("add_lanes first")
        batch = self._blank(batch_size)
        for session in self.lanes:
            self._run_on(session, batch)
        return batch

    def _rate(self, sessions: list[ort.InferenceSession], batch: np.ndarray, seconds: float) -> float:
        """Images/s of ``sessions`` run side by side, each by its own thread, for about ``seconds``."""
        counts = [0] * len(sessions)
        deadline = time.perf_counter() + seconds

        def drive(i: int) -> None:
            while True:
                self._run_on(sessions[i], batch)
                counts[i] += len(batch)
                if time.perf_counter() >= deadline:
                    return

        drivers = [threading.Thread(target=drive, args=(i,)) for i in range(len(sessions))]
        tick = time.perf_counter()
        for driver in drivers:
            driver.start()
        for driver in drivers:
            driver.join()
        return sum(counts) / (time.perf_counter() - tick)

    def _run_on(self, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        """One inference call on ``session`` at exactly this batch size (no bucket padding), for measuring."""
        return np.asarray(session.run([self.info.output_name], {self.info.input_name: batch})[0])

    def _blank(self, size: int) -> np.ndarray:
        """An all-zero model input of ``size`` images."""
        return np.zeros((size, *self.info.sample_shape), dtype=self.info.input_dtype)

    def session(self, instance: int) -> ort.InferenceSession:
        """The session of ``run``'s ``instance``: a lane (see ``add_lanes``), else one of the sessions."""
        if instance < len(self.lanes):
            return self.lanes[instance]
        return self.sessions[(instance - len(self.lanes)) % len(self.sessions)]

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """The largest batch this model will be given (and, on GPUs, its buckets)."""
        self.max_batch_size = max_batch_size
        self.buckets = batch_buckets(max_batch_size) if self.on_gpu else []

    def measure_batch_sizes(self, limit: int, budget_s: float) -> dict[int, float]:
        """Images per second of one session at power-of-two batch sizes up to ``limit``, within about
        ``budget_s`` seconds. First one run per size, smallest first, to find the sizes worth timing: the
        climb stops at ``limit``, at a size slower per image than the best so far by a fifth two sizes in a
        row, or when the next size would not fit half the budget; sizes far slower than the best are dropped
        (batch 1, the reference, never). Then timed rounds go over those sizes in turn,
        each round in the opposite order of the last, until the budget is spent (at least three rounds), so
        that a machine whose load changes meanwhile slows every size alike; the median run of each size
        counts."""
        started = time.perf_counter()
        sizes = self._sizes_worth_timing(powers_of_two(limit), budget_s / 2)
        runs: dict[int, list[float]] = {size: [] for size in sizes}
        rounds = 0
        while rounds < 3 or time.perf_counter() - started < budget_s:
            for size in sizes if rounds % 2 == 0 else reversed(sizes):
                runs[size].append(self._timed_run(size))
            rounds += 1
            if rounds >= 50:
                break
        self.batch_throughput = {size: size / statistics.median(times) for size, times in runs.items()}
        return self.batch_throughput

    def _sizes_worth_timing(self, sizes: list[int], budget_s: float) -> list[int]:
        started, last = time.perf_counter(), 0.0
        rates: dict[int, float] = {}
        worse_in_a_row = 0
        for size in sizes:
            if rates and time.perf_counter() - started + 4 * last > budget_s:
                break  # two runs of this size (each about twice the last one's time) would not fit
            last = min(self._timed_run(size), self._timed_run(size))  # the first run also allocates
            best = max(rates.values(), default=0.0)
            rates[size] = size / last
            worse_in_a_row = worse_in_a_row + 1 if rates[size] < 0.8 * best else 0
            if worse_in_a_row == 2:
                break
        best = max(rates.values())
        return [size for size, rate in rates.items() if rate >= 0.7 * best or size == 1]  # others cannot win

    def _timed_run(self, size: int) -> float:
        batch = self._blank(size)
        tick = time.perf_counter()
        self._run_on(self.sessions[0], batch)
        return time.perf_counter() - tick

    @staticmethod
    def _providers(device: str, trt_cache_dir: str, max_batch_size: int) -> list[Any]:
        cpu = "CPUExecutionProvider"
        cuda = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True})
        if device == "cpu":
            return [cpu]
        if device == "tensorrt":
            Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
            trt = (
                "TensorrtExecutionProvider",
                {"trt_engine_cache_enable": True, "trt_engine_cache_path": trt_cache_dir},
            )
            return [trt, cuda, cpu]
        available = ort.get_available_providers()
        if device == "auto" and "CUDAExecutionProvider" not in available:
            return [cpu]
        _load_cuda_libraries()
        return [cuda, cpu]

    def bucket(self, n: int) -> int:
        """The padded batch size for ``n`` items (``n`` itself on CPU)."""
        for size in self.buckets:
            if size >= n:
                return size
        return n

    def run(self, batch: np.ndarray, instance: int = 0) -> np.ndarray:
        """Logits for a batch of model-ready inputs (``info.sample_shape``, ``info.input_dtype``)."""
        n = batch.shape[0]
        padded = self.bucket(n)
        if padded != n:
            batch = np.concatenate([batch, np.zeros((padded - n, *batch.shape[1:]), dtype=batch.dtype)])
        session = self.session(instance)
        batch = np.ascontiguousarray(batch)
        if self.on_gpu:
            binding = session.io_binding()
            binding.bind_cpu_input(self.info.input_name, batch)
            binding.bind_output(self.info.output_name, "cuda")
            session.run_with_iobinding(binding)
            logits = binding.copy_outputs_to_cpu()[0]
        else:
            logits = session.run([self.info.output_name], {self.info.input_name: batch})[0]
        return np.asarray(logits[:n], dtype=np.float32)

    def warm_up(self) -> list[int]:
        """Run every session and lane once at each batch size it will see (each bucket on GPU; 1 and the
        maximum on CPU), so the first requests do not pay for allocation and algorithm search."""
        sizes = self.buckets or sorted({1, self.max_batch_size})
        for instance in range(len(self.lanes) + len(self.sessions)):
            for size in sizes:
                self.run(self._blank(size), instance)
        return sizes
