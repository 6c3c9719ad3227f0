"""In-process measurements: engines (PyTorch eager vs ONNX Runtime) and the serving limit.

- ``engine_rows``: images/s of PyTorch eager and ONNX Runtime on CPU, and on CUDA (fp32 and fp16)
  when a GPU is there, at batch sizes 1, 8 and 32, on random pixels.
- ``limit``: ONNX Runtime through the server's own runtime (``service.runtime.OnnxModel``: the same
  session options, provider and GPU buckets) at its best batch size, on pixels already decoded and
  preprocessed: what a server could reach if HTTP, decoding and batching cost nothing.

Each figure is the median of several timed calls after a warm-up call, so a short stall of the machine
moves it little.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.workloads import Workload, export_workload

if TYPE_CHECKING:
    from service.runtime import OnnxModel

logger = logging.getLogger(__name__)

ENGINE_BATCH_SIZES = (1, 8, 32)
LIMIT_BATCH_SIZES = (1, 2, 4, 8, 16)  # the bench adds the batch size our server chose


@dataclass
class Timing:
    images_per_s: float
    ms_per_call: float  # median
    calls: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(fn: Callable[[], object], items: int, budget_s: float, min_calls: int = 2, max_calls: int = 1000) -> Timing:
    """Call ``fn`` once to warm up, then at least ``min_calls`` times and until ``budget_s`` has passed."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return Timing(items / median, median * 1000.0, len(times))


def random_pixels(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


# --- engines ------------------------------------------------------------------------------------


def _torch_runner(workload: Workload, device: str, fp16: bool) -> Callable[[np.ndarray], Callable[[], object]]:
    import torch

    from model import create_model, default_preprocess
    from stageformer.core.preprocess import normalize

    torch.manual_seed(0)
    model = create_model(workload.preset).eval().to(device)
    dtype = torch.float16 if fp16 else torch.float32
    model = model.to(dtype)
    preprocess = default_preprocess(workload.preset)

    def prepare(pixels: np.ndarray) -> Callable[[], object]:
        x = torch.from_numpy(normalize(pixels, preprocess)).to(device=device, dtype=dtype)

        def call() -> object:
            with torch.inference_mode():
                out = model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        return call

    return prepare


def _ort_runner(path: Path, provider: str) -> Callable[[np.ndarray], Callable[[], object]] | None:
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"]))
    )
    if session.get_providers()[0] != provider:
        return None  # onnxruntime-gpu lists CUDA on machines where it cannot start
    name = session.get_inputs()[0].name

    def prepare(pixels: np.ndarray) -> Callable[[], object]:
        return lambda: session.run(None, {name: pixels})

    return prepare


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def engine_rows(
    workload: Workload,
    model_dir: Path,
    *,
    batch_sizes: tuple[int, ...] = ENGINE_BATCH_SIZES,
    budget_s: float = 2.0,
    progress: Callable[[str], None] = logger.info,
) -> list[dict[str, Any]]:
    """One row per (engine, batch size). GPU engines appear only where CUDA really runs."""
    onnx_path = export_workload(workload, model_dir, progress=progress)
    engines: list[tuple[str, Callable[[np.ndarray], Callable[[], object]] | None]] = [
        ("PyTorch eager, CPU", _torch_runner(workload, "cpu", False)),
        ("ONNX Runtime, CPU", _ort_runner(onnx_path, "CPUExecutionProvider")),
    ]
    if cuda_available():
        engines += [
            ("PyTorch eager, CUDA", _torch_runner(workload, "cuda", False)),
            ("PyTorch eager, CUDA fp16", _torch_runner(workload, "cuda", True)),
        ]
    cuda_ort = _ort_runner(onnx_path, "CUDAExecutionProvider")
    if cuda_ort is not None:
        fp16_path = export_workload(workload, model_dir, fp16=True, progress=progress)
        engines += [
            ("ONNX Runtime, CUDA", cuda_ort),
            ("ONNX Runtime, CUDA fp16", _ort_runner(fp16_path, "CUDAExecutionProvider")),
        ]
    rows = []
    for engine, runner in engines:
        if runner is None:
            continue
        for batch in batch_sizes:
            timing = measure(runner(random_pixels(batch, workload.image_size)), batch, budget_s)
            progress(f"{workload.name} {engine} batch {batch}: {timing.images_per_s:.1f} images/s")
            rows.append({"workload": workload.name, "engine": engine, "batch": batch, **timing.to_dict()})
    return rows


# --- the limit ------------------------------------------------------------------------------------


def limit(
    onnx_path: Path,
    image_size: int,
    *,
    batch_sizes: tuple[int, ...] = LIMIT_BATCH_SIZES,
    budget_s: float = 2.0,
    progress: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """ONNX Runtime on decoded pixels at each batch size, three ways on CPU: through the server's own runtime
    (``OnnxModel``: its session options, provider, GPU buckets and IO binding), as single-thread sessions
    side by side, one per core (the server's lanes under load), and as a session with ONNX Runtime's default
    options; the fastest counts. ``best`` is the highest images/s. One session at a time, batch sizes
    ascending: a session's memory arena keeps its largest batch."""
    import gc

    from service.registry import cpu_count
    from service.runtime import OnnxModel

    ways: dict[str, dict[int, Timing]] = {}
    runtime = OnnxModel(onnx_path, device="auto", max_batch_size=max(batch_sizes))
    provider = runtime.provider
    ways["server runtime"] = {
        b: measure(functools.partial(runtime.run, random_pixels(b, image_size)), b, budget_s) for b in batch_sizes
    }
    if not runtime.on_gpu and cpu_count() > 1:
        runtime.add_lanes(cpu_count(), 1)
        ways["sessions side by side"] = {b: _side_by_side(runtime, b, budget_s) for b in batch_sizes}
    del runtime
    gc.collect()
    default = _ort_runner(onnx_path, provider) or _ort_runner(onnx_path, "CPUExecutionProvider")
    assert default is not None
    ways["ONNX Runtime defaults"] = {
        b: measure(default(random_pixels(b, image_size)), b, budget_s) for b in batch_sizes
    }
    del default
    gc.collect()
    per_batch: dict[int, dict[str, Any]] = {}
    for batch in batch_sizes:
        way = max(ways, key=lambda w: ways[w][batch].images_per_s)
        per_batch[batch] = {
            **ways[way][batch].to_dict(),
            "way": way,
            **{w: t[batch].images_per_s for w, t in ways.items()},
        }
        progress(
            f"limit batch {batch}: "
            + ", ".join(f"{w} {t[batch].images_per_s:.1f}" for w, t in ways.items())
            + " images/s"
        )
    best = max(per_batch, key=lambda b: per_batch[b]["images_per_s"])
    return {
        "provider": provider,
        "per_batch": per_batch,
        "best_batch": best,
        "images_per_s": per_batch[best]["images_per_s"],
    }


def _side_by_side(runtime: OnnxModel, batch: int, budget_s: float) -> Timing:
    """``measure``'s figure for the runtime's lanes run at once (the median of three stretches); its ms per
    call is per batch of the lanes together."""
    rate = runtime.lanes_rate(batch, budget_s / 3, rounds=3)
    return Timing(rate, 1000.0 * batch / rate, 3)


def combine_limits(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ``limit`` measurements (one per round of the serving runs) as one: per batch size the
    mean images/s of the rounds that measured it, and the best batch size of those means."""
    if not rounds:
        raise ValueError("no limit measurements to combine")
    per_batch: dict[int, dict[str, Any]] = {}
    for batch in sorted({int(b) for r in rounds for b in r["per_batch"]}):
        values = [v for v in (_at(r, batch) for r in rounds) if v is not None]
        per_batch[batch] = {"images_per_s": statistics.fmean(values), "rounds": values}
    best = max(per_batch, key=lambda b: per_batch[b]["images_per_s"])
    return {
        "provider": rounds[0]["provider"],
        "per_batch": per_batch,
        "best_batch": best,
        "images_per_s": per_batch[best]["images_per_s"],
        "measurements": len(rounds),
    }


def _at(measured: dict[str, Any], batch: int) -> float | None:
    """images/s at ``batch`` of one limit measurement (keys are ints, or strings after a trip through JSON)."""
    found = measured["per_batch"].get(batch, measured["per_batch"].get(str(batch)))
    return None if found is None else float(found["images_per_s"])
