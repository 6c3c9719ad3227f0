"""``python -m bench gpu`` on a machine without a GPU: it refuses at once, saying "no CUDA device", before any
install. With a stand-in ``nvidia-smi`` that reports a card, ``--dry-run`` shows the plan without installing:
two environments that never mix the two ONNX Runtime packages, ``onnxruntime-gpu`` built for the driver's CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu

ROOT = Path(__file__).resolve().parents[2]

H200_BANNER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: {cuda}     |
+-----------------------------------------------------------------------------------------+
"""


def check(*args: str, path: str | None = None) -> tuple[int, str, float]:
    env = {**os.environ, **({"PATH": path} if path is not None else {})}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "gpu", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def fake_nvidia_smi(folder: Path, cuda: str = "12.4", fail: bool = False) -> Path:
    """A stand-in ``nvidia-smi``: one H200 and a banner naming ``cuda``, or the driver's failure."""
    script = folder / "nvidia-smi"
    if fail:
        body = 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9'
    else:
        banner = H200_BANNER.format(cuda=cuda)
        body = f'case "$1" in --query-gpu=*) echo "NVIDIA H200, 550.54.15";; *) cat <<\'EOF\'\n{banner}EOF\n;; esac'
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def test_refuses_without_a_gpu_before_installing_anything(tmp_path: Path) -> None:
    code, out, seconds = check("--nvidia-smi", str(tmp_path / "no-such-nvidia-smi"), "--work", str(tmp_path / "w"))
    assert code == 2 and "no CUDA device" in out, out
    assert "not found" in out and seconds < 30
    assert not (tmp_path / "w").exists()  # nothing was made, nothing installed


def test_refuses_on_this_machine_when_it_has_no_gpu(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    code, out, _ = check("--work", str(tmp_path / "w"))
    assert code != 0 and "no CUDA device" in out, out


def test_refuses_when_the_driver_does_not_answer(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(tmp_path, fail=True)
    code, out, _ = check("--nvidia-smi", str(smi), "--work", str(tmp_path / "w"))
    assert code == 2 and "no CUDA device" in out and "status 9" in out, out


@pytest.mark.parametrize(("cuda", "spec"), [("12.4", "onnxruntime-gpu[cuda,cudnn]>=1.20,<1.27"),
                                            ("13.0", "onnxruntime-gpu[cuda,cudnn]>=1.27")])  # fmt: skip
def test_dry_run_plans_two_environments(tmp_path: Path, cuda: str, spec: str) -> None:
    smi = fake_nvidia_smi(tmp_path, cuda=cuda)
    code, out, _ = check("--nvidia-smi", str(smi), "--dry-run", "--work", str(tmp_path / "w"))
    assert code == 0, out
    assert f"NVIDIA H200, driver 550.54.15, CUDA {cuda}" in out
    lines = {line.split(":", 1)[0]: line.split() for line in out.splitlines() if line.startswith(("export:", "serve:"))}
    export, serve = lines["export"], lines["serve"]
    assert spec in serve and "onnxruntime>=1.18" not in serve and "fastapi>=0.110" in serve
    assert gpu.TORCH in export and "onnxruntime>=1.18" in export
    assert not any(w.startswith("onnxruntime-gpu") for w in export)
    assert not (tmp_path / "w").exists()


def test_requirements_resolve_the_extras() -> None:
    export = [gpu.package_name(r) for r in gpu.requirements("export")]
    serve = [gpu.package_name(r) for r in gpu.requirements("gpu")]
    assert {"torch", "onnx", "onnxruntime", "numpy", "pillow"} <= set(export)
    assert "onnxruntime-gpu" in serve and "onnxruntime" not in serve and "torch" not in serve
    assert not any(r.startswith("stageformer") for r in gpu.requirements("export"))


def test_card_and_library_parsing(tmp_path: Path) -> None:
    assert gpu.driver_cuda(H200_BANNER.format(cuda="12.8")) == (12, 8)
    with pytest.raises(gpu.NoDeviceError):
        gpu.driver_cuda("no banner")
    with pytest.raises(gpu.NoDeviceError, match="CUDA 12 or 13"):
        gpu.onnxruntime_gpu_spec((11, 8))
    library = tmp_path / "libonnxruntime_providers_tensorrt.so"
    library.write_bytes(b"\x7fELF\0\0libcudart.so.12\0libnvinfer.so.10\0libstdc++.so.6\0")
    assert gpu.needed_version(library, "libnvinfer.so") == 10
    assert gpu.needed_version(library, "libcudart.so") == 12
    assert gpu.needed_version(library, "libcudnn.so") is None
    assert gpu.needed_version(tmp_path / "missing.so", "libnvinfer.so") is None
