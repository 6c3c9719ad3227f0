"""GPU paths of the runtime: CUDA with IO binding and batch buckets, TensorRT with its engine cache.
They skip, saying why, where ONNX Runtime cannot really start CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.runtime import OnnxModel
from stageformer.core.cuda import cuda_provider_works

needs_cuda = pytest.mark.skipif(
    not cuda_provider_works(),
    reason=f"ONNX Runtime cannot run CUDA here (providers listed: {', '.join(ort.get_available_providers())})",
)


def _inputs(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@needs_cuda
def test_cuda_matches_cpu_through_io_binding_and_buckets(tiny_onnx: Path) -> None:
    try:
        gpu = OnnxModel(tiny_onnx, device="cuda", max_batch_size=8)
    except RuntimeError as exc:
        pytest.skip(f"CUDA is listed but does not start here: {exc}")
    cpu = OnnxModel(tiny_onnx, device="cpu", max_batch_size=8)
    assert gpu.provider == "CUDAExecutionProvider" and gpu.on_gpu
    assert gpu.buckets == [1, 2, 4, 8]
    assert gpu.warm_up() == [1, 2, 4, 8]
    for n in (1, 3, 5, 8):
        batch = _inputs(n)
        assert gpu.bucket(n) >= n
        out = gpu.run(batch)
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, cpu.run(batch), atol=1e-3)


@needs_cuda
def test_tensorrt_caches_its_engines(tiny_onnx: Path, tmp_path: Path) -> None:
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no TensorRT execution provider in this ONNX Runtime build")
    try:
        trt = OnnxModel(tiny_onnx, device="tensorrt", max_batch_size=4, trt_cache_dir=str(tmp_path / "trt"))
    except RuntimeError as exc:
        pytest.skip(f"TensorRT is listed but does not start here: {exc}")
    trt.warm_up()
    cpu = OnnxModel(tiny_onnx, device="cpu")
    np.testing.assert_allclose(trt.run(_inputs(3)), cpu.run(_inputs(3)), atol=1e-2)
    assert any((tmp_path / "trt").iterdir()), "TensorRT wrote no engine to its cache"


def test_auto_reports_the_provider_that_really_runs(tiny_onnx: Path) -> None:
    model = OnnxModel(tiny_onnx, device="auto")
    assert model.provider == model.sessions[0].get_providers()[0]
    assert model.on_gpu == (model.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    if not model.on_gpu:
        assert model.buckets == [] and model.bucket(5) == 5  # no padding on CPU
