"""The GPU check's stages (``bench.gpu`` runs them), each inside one of its environments:

    python -m bench.gpu_stages export   --work DIR   # export environment: fp32 and fp16 ONNX files of the preset
    python -m bench.gpu_stages measure  --work DIR   # serve environment: CUDA provider, parity, limit, serving
    python -m bench.gpu_stages tensorrt --work DIR   # serve environment with TensorRT's libraries

Each prints ``@@step NAME`` when a step starts and ``@@check {"status", "name", "figure"}`` for each outcome, on
standard output; everything else it says goes to standard error (the stage's log). ``measure --device cpu`` runs
the same steps on the CPU, to try the code where there is no GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from service.runtime import OnnxModel

PROTOCOL = "@@"
BATCH = 32  # the batch size the served/limit check is about
SERVED_MIN = 0.8  # served images/s over the in-process limit at that batch size
FP32_ATOL = 2e-2  # |logit| difference to fp32 on the CPU: TF32 convolutions on CUDA, random-weight logits ~1
FP16_ATOL = 5e-2  # the export's own fp16 tolerance
CLIENTS = (4, 8)  # concurrent /v2 clients, 32 images each; the better level counts


def step(name: str) -> None:
    print(f"{PROTOCOL}step {name}", flush=True)


def check(status: str, name: str, figure: str) -> None:
    print(f"{PROTOCOL}check " + json.dumps({"status": status, "name": name, "figure": figure}), flush=True)


def passed(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def model_files(work: Path, preset: str) -> dict[str, Path]:
    models = work / "models"
    return {"fp32": models / f"{preset}.onnx", "fp16": models / f"{preset}-fp16.onnx"}


# --- export -------------------------------------------------------------------------------------


def export_stage(work: Path, preset: str) -> None:
    """The fp32 and fp16 files, each through the export's parity gate (ONNX Runtime on the CPU)."""
    from bench.workloads import export_workload, pick_workloads
    from export.onnx import read_onnx_metadata
    from stageformer.core.formats import PARITY_KEY

    workload = pick_workloads([preset])[0]
    for precision, path in model_files(work, preset).items():
        step(f"export {precision}")
        started = time.perf_counter()
        try:
            export_workload(workload, path.parent, fp16=precision == "fp16", name=path.stem, parity_batch_sizes=(1, 3))
        except Exception as exc:  # the parity gate or the exporter said no: that is the check's answer
            check("FAIL", f"export {precision}", f"{type(exc).__name__}: {exc}"[:400])
            continue
        parity = json.loads(read_onnx_metadata(path).get(PARITY_KEY, "{}"))
        worst = parity.get("max_abs_diff")
        figure = f"{path.name}, {path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s"
        gate = f"; parity gate on the CPU: max |Δlogit| {worst:.2e}" if worst is not None else ""
        check("PASS", f"export {precision}", figure + gate)


# --- measure ------------------------------------------------------------------------------------


def gpu_memory_mib() -> float | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        return float(out.stdout.split()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def timed(fn: Callable[[], object], seconds: float = 2.0) -> float:
    """Median seconds of one call, after a warm-up call: at least three calls, and more for ``seconds``."""
    from bench.engine import measure

    return measure(fn, 1, seconds, min_calls=3).ms_per_call / 1000.0


def inputs(model: OnnxModel, count: int) -> np.ndarray:
    """``count`` model inputs: the bench's pictures decoded the server's way, then random pixels."""
    import numpy as np

    from bench.images import load_images
    from service.images import prepare

    pictures = [prepare(j, model.info.preprocess, 40_000_000) for j in load_images(8).jpegs]
    size = model.info.preprocess.image_size
    noise = np.random.default_rng(0).integers(0, 256, (max(0, count - len(pictures)), size, size, 3), dtype=np.uint8)
    return np.concatenate([np.stack(pictures), noise])[:count]


def provider_check(path: Path, device: str) -> OnnxModel | None:
    """The server's runtime on ``device``: the session's provider, GPU memory it took, speed against the CPU."""
    from service.runtime import ModelLoadError, OnnxModel

    step("cuda provider")
    before = gpu_memory_mib()
    try:
        model = OnnxModel(path, device=device, max_batch_size=BATCH)
    except ModelLoadError as exc:
        check("FAIL", "cuda provider", str(exc)[:400])
        return None
    model.warm_up()
    after = gpu_memory_mib()
    batch = inputs(model, BATCH)
    here = timed(lambda: model.run(batch))
    cpu = OnnxModel(path, device="cpu", max_batch_size=BATCH)
    on_cpu = timed(lambda: cpu.run(batch), seconds=1.0)
    took = None if before is None or after is None else after - before
    on_gpu = model.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    ok = on_gpu and (took is None or took > 0) if device == "cuda" else True
    memory = "GPU memory unknown" if took is None else f"took {took:.0f} MiB of GPU memory"
    check(
        passed(ok),
        "cuda provider",
        f"session runs on {model.provider}, {memory}; batch {BATCH} in {here * 1000:.1f} ms "
        f"against {on_cpu * 1000:.0f} ms on the CPU provider ({on_cpu / here:.0f}x)",
    )
    return model if ok else None


def parity_check(files: dict[str, Path], device: str) -> None:
    """Each file through the server's runtime on the device, against fp32 on the CPU, at batch 32 and at 5 (padded
    to a bucket)."""
    import numpy as np

    from service.runtime import OnnxModel

    step("parity")
    reference = OnnxModel(files["fp32"], device="cpu", max_batch_size=BATCH)
    batch = inputs(reference, BATCH)
    expected = reference.run(batch)
    for precision, path in files.items():
        atol = FP16_ATOL if precision == "fp16" else FP32_ATOL
        model = OnnxModel(path, device=device, max_batch_size=BATCH)
        got = np.concatenate([model.run(batch), model.run(batch[:5])])
        want = np.concatenate([expected, expected[:5]])
        worst = float(np.abs(got - want).max())
        agree = float((got.argmax(1) == want.argmax(1)).mean())
        check(
            passed(worst <= atol),
            f"parity {precision} on {device}",
            f"max |Δlogit| {worst:.2e} (≤ {atol:g}) against fp32 on the CPU, top-1 agreement {agree:.0%}, "
            f"batches of {BATCH} and 5 (logits up to {float(np.abs(want).max()):.2f})",
        )
        del model


def limits(files: dict[str, Path], size: int) -> dict[str, float]:
    """In-process images/s at batch 32 of each file (the better of the server's runtime and a plain session)."""
    from bench.engine import limit

    step("limit")
    found = {}
    for precision, path in files.items():
        measured = limit(path, size, batch_sizes=(BATCH,), budget_s=3.0, progress=lambda m: print(m, file=sys.stderr))
        found[precision] = float(measured["images_per_s"])
        figures = measured["per_batch"][BATCH]
        ways = ", ".join(f"{way} {figures[way]:.0f}" for way in ("server runtime", "ONNX Runtime defaults"))
        check("INFO", f"limit {precision} batch {BATCH}", f"{found[precision]:.0f} images/s in-process ({ways})")
    return found


def serve_check(work: Path, files: dict[str, Path], size: int, device: str, limit: dict[str, float]) -> None:
    """``stageformer serve`` with both files, under load: /v2 batches of 32 against the limit, /v1 JPEG files."""
    from bench import servers
    from bench.images import load_images
    from bench.loadgen import LoadPlan, run_level
    from stageformer.local import free_port

    step("serve")
    port = free_port()
    argv = [sys.executable, "-m", "stageformer", "serve", *map(str, files.values()), "--device", device]
    argv += ["--max-batch-size", str(BATCH), "--host", servers.HOST, "--port", str(port), "--log-level", "warning"]
    argv += ["--grpc-port", "0"]  # HTTP only: no listener on the default gRPC port
    process = servers.ServerProcess("stageformer", argv, port, "/v2/health/ready", work / "server.log")
    try:
        seconds = process.start(timeout_s=300)
    except servers.ServerError as exc:
        check("FAIL", "serve", str(exc)[-400:])
        return
    check("INFO", "serve start-up", f"ready in {seconds:.0f} s (models loaded, every bucket warmed up)")
    import numpy as np

    images = load_images(8)
    try:
        for precision, path in files.items():
            step(f"served {precision}")
            model = path.stem
            batch = np.random.default_rng(1).integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
            request = servers.v2_request(port, model, batch)
            best: tuple[float, str] = (0.0, "no answers")
            for clients in CLIENTS:
                counters = servers.Counters("stageformer", port, model, work / "none.txt", process.pid)
                plan = LoadPlan(clients, 8.0, warmup_s=3.0, request_timeout_s=60.0)
                level = asyncio.run(run_level(servers.HOST, port, [request], plan, *counters.hooks()))
                served = level.throughput * BATCH
                mean = counters.mean_batch()
                figure = (
                    f"{served:.0f} images/s at {clients} clients (p50 {level.latency_ms['p50']:.0f} ms, mean batch "
                    f"{mean or 0:.1f}, {level.errors} errors)"
                )
                print(figure, file=sys.stderr)
                if level.errors == 0 and served > best[0]:
                    best = (served, figure)
            ratio = best[0] / limit[precision]
            check(
                passed(ratio >= SERVED_MIN),
                f"served/limit {precision} b{BATCH}",
                f"{ratio:.2f} (≥ {SERVED_MIN}): /v2, {BATCH} images a request: {best[1]}; in-process "
                f"{limit[precision]:.0f} images/s",
            )
            jpegs = servers.requests_for(servers.STANDARD[servers.OURS_V1], port, model, images, [])
            counters = servers.Counters("stageformer", port, model, work / "none.txt", process.pid)
            level = asyncio.run(
                run_level(servers.HOST, port, jpegs, LoadPlan(64, 6.0, warmup_s=2.0), *counters.hooks())
            )
            mean = counters.mean_batch() or 0.0
            check(
                "INFO",
                f"served /v1 JPEG {precision}",
                f"{level.throughput:.0f} images/s at 64 clients, one JPEG a request (p50 "
                f"{level.latency_ms['p50']:.0f} ms, mean batch {mean:.1f}, {level.errors} errors)",
            )
    finally:
        process.stop()


def measure_stage(work: Path, preset: str, device: str) -> None:
    files = {precision: path for precision, path in model_files(work, preset).items() if path.is_file()}
    if "fp32" not in files:
        check("FAIL", "models", f"no {preset}.onnx: the export failed")
        return
    model = provider_check(files["fp32"], device)
    if model is None:
        return
    size = model.info.preprocess.image_size
    del model
    parity_check(files, device)
    found = limits(files, size)
    (work / "limits.json").write_text(json.dumps(found))
    serve_check(work, files, size, device, found)


# --- TensorRT -----------------------------------------------------------------------------------


def tensorrt_stage(work: Path, preset: str, budget_s: float) -> None:
    """A TensorRT session with one optimisation profile for batches 1-32 in fp16 (how TensorRT is meant to run
    here), then the server's own runtime with ``--device tensorrt``."""
    import onnxruntime as ort

    from service.runtime import OnnxModel

    started = time.monotonic()
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        check("SKIP", "tensorrt", f"not in this ONNX Runtime's providers ({ort.get_available_providers()})")
        return
    files = model_files(work, preset)
    reference = OnnxModel(files["fp32"], device="cpu", max_batch_size=BATCH)
    batch = inputs(reference, BATCH)
    expected = reference.run(batch)
    if not tensorrt_session(work, files["fp32"], reference, batch, expected):
        return
    left = budget_s - (time.monotonic() - started)
    if left < 60:
        check("SKIP", "tensorrt server runtime", f"{left:.0f} s left of the deadline")
        return
    tensorrt_server_runtime(work, files["fp32"], batch, expected)


def tensorrt_session(work: Path, path: Path, reference: OnnxModel, batch: np.ndarray, expected: np.ndarray) -> bool:
    """ONNX Runtime's TensorRT provider in fp16 with a profile for batches 1 to 32; False when it did not start."""
    import numpy as np
    import onnxruntime as ort

    step("tensorrt session")
    size, name = reference.info.preprocess.image_size, reference.info.input_name
    shapes = {k: f"{name}:{n}x{size}x{size}x3" for k, n in (("min", 1), ("opt", BATCH), ("max", BATCH))}
    options: dict[str, Any] = {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(work / "trt-cache"),
        **{f"trt_profile_{k}_shapes": v for k, v in shapes.items()},
    }
    providers: list[Any] = [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]
    tick = time.perf_counter()
    session = ort.InferenceSession(str(path), providers=providers)
    if session.get_providers()[0] != "TensorrtExecutionProvider":
        check("FAIL", "tensorrt", f"TensorRT did not start (active: {session.get_providers()})")
        return False
    got = session.run(None, {name: batch})[0]
    build = time.perf_counter() - tick
    per_call = timed(lambda: session.run(None, {name: batch}))
    worst = float(np.abs(got - expected).max())
    cuda = _cuda_limits(work)
    versus = f" ({BATCH / per_call / cuda['fp16']:.2f}x the CUDA provider's fp16 file)" if "fp16" in cuda else ""
    check(
        passed(worst <= FP16_ATOL),
        "tensorrt fp16 session",
        f"engine built in {build:.0f} s; {BATCH / per_call:.0f} images/s at batch {BATCH}{versus}; max |Δlogit| "
        f"{worst:.2e} (≤ {FP16_ATOL:g}) against fp32 on the CPU",
    )
    return True


def tensorrt_server_runtime(work: Path, path: Path, batch: np.ndarray, expected: np.ndarray) -> None:
    """What ``stageformer serve --device tensorrt --max-batch-size 32`` does at start-up: load, warm up every
    bucket; then the same parity."""
    import numpy as np

    from service.runtime import OnnxModel

    step("server runtime --device tensorrt")
    tick = time.perf_counter()
    model = OnnxModel(path, device="tensorrt", max_batch_size=BATCH, trt_cache_dir=str(work / "trt-server"))
    sizes = model.warm_up()
    warm = time.perf_counter() - tick
    worst = float(np.abs(model.run(batch) - expected).max())
    check(
        passed(worst <= FP32_ATOL),
        "tensorrt server runtime",
        f"{model.provider}; loaded and warmed up at batch sizes {sizes} in {warm:.0f} s; max |Δlogit| {worst:.2e} "
        f"(≤ {FP32_ATOL:g})",
    )


def _cuda_limits(work: Path) -> dict[str, float]:
    path = work / "limits.json"
    found: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("export", "measure", "tensorrt"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--preset", default="poolformer_s12")
    parser.add_argument("--device", default="cuda", help="measure: cuda, or cpu to try the steps without a GPU")
    parser.add_argument("--budget", type=float, default=300.0, help="tensorrt: seconds for the stage")
    args = parser.parse_args(argv)
    if args.stage == "export":
        export_stage(args.work, args.preset)
    elif args.stage == "measure":
        measure_stage(args.work, args.preset, args.device)
    else:
        tensorrt_stage(args.work, args.preset, args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
