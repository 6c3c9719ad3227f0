"""A Triton Inference Server model repository entry for an exported model (torch-free).

Layout, as Triton's ONNX Runtime backend expects it::

    DIR/<name>/config.pbtxt
    DIR/<name>/labels.txt        one label per line, named by the output's label_filename
    DIR/<name>/1/model.onnx      (and model.onnx's external data file, for models over 2 GB)

The config is written by hand as protobuf text format; the tests parse it with Triton's own
``ModelConfig`` schema. Every file appears atomically (written beside, then renamed), and other
versions already in ``DIR/<name>/`` are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stageformer.core.formats import INPUT_NAME, OUTPUT_NAME
from stageformer.core.naming import check_model_name

LABELS_FILE = "labels.txt"
VERSION = "1"


@dataclass(frozen=True)
class TritonModel:
    """What the config needs to know about the ONNX model."""

    name: str
    input_format: str  # "raw": uint8 [H, W, 3]; "normalized": float32 [3, H, W]
    image_size: int
    num_classes: int
    max_batch_size: int
    max_queue_delay_us: int


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid protobuf text-format string


def config_pbtxt(model: TritonModel) -> str:
    """The ``config.pbtxt`` text: ONNX Runtime backend, dynamic batching, tensors without the batch axis."""
    if model.input_format == "raw":
        data_type, fmt, dims = "TYPE_UINT8", "FORMAT_NHWC", (model.image_size, model.image_size, 3)
    else:
        data_type, fmt, dims = "TYPE_FP32", "FORMAT_NCHW", (3, model.image_size, model.image_size)
    return "\n".join(
        [
            f"name: {_quote(model.name)}",
            'backend: "onnxruntime"',
            f"max_batch_size: {model.max_batch_size}",
            "input [",
            "  {",
            f"    name: {_quote(INPUT_NAME)}",
            f"    data_type: {data_type}",
            f"    format: {fmt}",
            f"    dims: [ {', '.join(map(str, dims))} ]",
            "  }",
            "]",
            "output [",
            "  {",
            f"    name: {_quote(OUTPUT_NAME)}",
            "    data_type: TYPE_FP32",
            f"    dims: [ {model.num_classes} ]",
            f"    label_filename: {_quote(LABELS_FILE)}",
            "  }",
            "]",
            "dynamic_batching {",
            f"  max_queue_delay_microseconds: {model.max_queue_delay_us}",
            "}",
            "",
        ]
    )


def labels_text(labels: Sequence[str]) -> str:
    """One label per line (line breaks inside a label become spaces, so line i stays class i)."""
    return "".join(" ".join(label.splitlines()) + "\n" for label in labels)


def check_triton_options(max_batch_size: int, max_queue_delay_us: int) -> None:
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"triton max batch size must be a positive integer, got {max_batch_size!r}")
    if isinstance(max_queue_delay_us, bool) or not isinstance(max_queue_delay_us, int) or max_queue_delay_us < 0:
        raise ValueError(f"triton max queue delay must be an integer >= 0 microseconds, got {max_queue_delay_us!r}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def write_repository(
    repo: str | os.PathLike[str],
    model: TritonModel,
    onnx_path: str | os.PathLike[str],
    labels: Sequence[str],
    external_data: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``repo/<name>/`` for the ONNX file at ``onnx_path``; returns that model directory.

    ``external_data`` is the weights side file of a model over 2 GB; it keeps its name, which the
    ONNX file refers to."""
    check_model_name(model.name)
    check_triton_options(model.max_batch_size, model.max_queue_delay_us)
    if len(labels) != model.num_classes:
        raise ValueError(f"{len(labels)} labels for {model.num_classes} classes")
    model_dir = Path(repo) / model.name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    if external_data is not None:
        _copy_atomic(Path(external_data), version_dir / Path(external_data).name)
    _copy_atomic(Path(onnx_path), version_dir / "model.onnx")
    _write_atomic(model_dir / LABELS_FILE, labels_text(labels))
    _write_atomic(model_dir / "config.pbtxt", config_pbtxt(model))
    return model_dir
