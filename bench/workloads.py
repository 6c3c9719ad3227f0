"""The models the benchmark runs, and their ONNX files, exported by ``export_onnx`` from randomly
initialised weights (speed does not depend on the weights). Every system serves the same file."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    """One model at one input size."""

    preset: str  # a name from ``stageformer presets``
    image_size: int  # square input side, as the preset defines it

    @property
    def name(self) -> str:
        return f"{self.preset}@{self.image_size}"


WORKLOADS: dict[str, Workload] = {
    w.preset: w
    for w in (
        Workload("poolformer_s12", 224),
        Workload("seed_metaformer", 224),
        Workload("xformers_cifar_metaformer", 32),
    )
}


# The parts of a run (``--only``, ``--skip``).
PARTS = ("engine", "serving", "threads", "int8")

# The threads study: our server's thread settings tried, as ``name=value`` pairs of `stageformer serve` flags
# (without the dashes), comma-separated; "defaults" sets none. And the workloads it runs them on.
THREAD_VARIANTS = (
    "defaults",
    "lanes=0",
    "lanes=2",
    "threads=1",
    "threads=2",
    "threads=1,instances=2",
    "threads=2,decode-workers=1",
)
THREAD_WORKLOADS = ("poolformer_s12", "xformers_cifar_metaformer")


def pick_workloads(names: list[str] | None) -> list[Workload]:
    """Workloads by preset name (the benchmark's three when ``names`` is empty). Any other preset runs at
    its own input size (``tiny`` makes a quick check); an unknown name is an error listing the valid ones."""
    if not names:
        return list(WORKLOADS.values())
    from model.presets import get_preset, list_presets  # torch is imported only here

    unknown = [n for n in names if n not in WORKLOADS and n not in list_presets()]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(list_presets())}")
    return [WORKLOADS.get(n) or Workload(n, get_preset(n).preprocess.image_size) for n in names]


@functools.cache
def code_digest() -> str:
    """A hash of the model and export code: an export made by other code is made again. Taken once per process,
    so that a run uses the same files from start to end while the code changes beside it."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("model/*.py"), *root.glob("export/*.py")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def folder_digest(folder: Path) -> str:
    """A hash of the names and bytes of the files in a folder (the calibration images)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def export_workload(
    workload: Workload,
    folder: Path,
    *,
    fp16: bool = False,
    quantize: str | None = None,
    calibration: Path | None = None,
    name: str | None = None,
    seed: int = 0,
    parity_batch_sizes: tuple[int, ...] = (1, 3),
    rebuild: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """``folder/<preset>[-fp16|-int8].onnx``, exported once and reused while its recorded recipe (preset, seed,
    precision, calibration images, model name, the code) matches. ``quantize="int8"`` needs ``calibration``, a
    folder of images, and an ``export_onnx`` that quantizes. ``name``: the model's name (default: the preset)."""
    import torch

    from export import export_onnx
    from export.onnx import read_onnx_metadata
    from model import create_model, default_preprocess, save_checkpoint

    stem = workload.preset + ("-fp16" if fp16 else "") + (f"-{quantize}" if quantize else "")
    onnx_path = folder / f"{stem}.onnx"
    recipe_data: dict[str, Any] = {"preset": workload.preset, "seed": seed, "fp16": fp16, "code": code_digest()}
    if name:
        recipe_data["name"] = name
    extra: dict[str, Any] = {}
    if quantize:
        if calibration is None:
            raise ValueError("quantize needs a calibration folder")
        recipe_data.update(quantize=quantize, calibration=folder_digest(calibration))
        extra = {"quantize": quantize, "calibration": calibration}
    recipe = json.dumps(recipe_data, sort_keys=True)
    stamp = folder / f"{stem}.recipe.json"
    if not rebuild and onnx_path.is_file() and stamp.is_file() and stamp.read_text() == recipe:
        read_onnx_metadata(onnx_path)  # a damaged file fails here rather than in a server
        return onnx_path
    folder.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"exporting {stem} to ONNX")
    torch.manual_seed(seed)
    model = create_model(workload.preset)
    checkpoint = save_checkpoint(model, folder / f"{workload.preset}.safetensors", default_preprocess(workload.preset))
    name = name or workload.preset
    export_onnx(checkpoint, onnx_path, fp16=fp16, name=name, parity_batch_sizes=parity_batch_sizes, **extra)
    stamp.write_text(recipe)
    return onnx_path
