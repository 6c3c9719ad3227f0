"""Checkpoint -> ONNX file: trace, parity gate, metadata, atomic save, optional Triton repository.

``export_onnx`` is the whole pipeline. Its steps, each reported through ``progress`` (or logged):

- load: read the checkpoint, hash it, run the model once in PyTorch (a model that cannot run or gives
  NaN fails here, before anything is traced or written);
- trace: ``torch.export`` + ``torch.onnx`` (dynamo exporter, opset 20 by default) of the model wrapped
  with its input handling: ``uint8 [batch, H, W, 3]`` normalized inside the graph (``raw``) or
  ``float32 [batch, 3, H, W]`` (``normalized``); ``float32 [batch, num_classes]`` logits out;
- check: ONNX Runtime (CPU) against PyTorch eval on seeded real-looking and random images at batch
  sizes 1, 3 and 8 (``export.parity``); a difference above ``atol`` fails the export;
- save: metadata (config, preprocessing, labels, provenance, parity figures) into ``metadata_props``,
  written beside the target and renamed into place, so a failed export leaves no file behind;
- triton: optionally, ``DIR/<name>/{config.pbtxt, labels.txt, 1/model.onnx}``.

What it cannot do: check fp16 numerics on a CPU-only machine beyond "loads and runs": ONNX Runtime's
CPU provider computes most fp16 nodes in fp32 (it inserts casts), so the CPU figure of an fp16 graph
says little about what a GPU computes. Where a CUDA provider works, the fp16 graph is also checked there.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from model import Checkpoint, CheckpointError, load_checkpoint
from stageformer.core.formats import (
    CHECKPOINT_REQUIRED_KEYS,
    INPUT_FORMATS,
    INPUT_NAME,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    OUTPUT_NAME,
    VERSION_KEY,
)
from stageformer.core.naming import check_model_name
from stageformer.core.preprocess import PreprocessConfig, normalize

from . import parity as parity_lib
from .options import (
    BATCH_DIM,
    DEFAULT_ATOL,
    DEFAULT_EXPORTER,
    DEFAULT_FP16_ATOL,
    DEFAULT_OPSET,
    DEFAULT_TRITON_MAX_BATCH_SIZE,
    DEFAULT_TRITON_QUEUE_DELAY_US,
    EXPORTERS,
    EXTERNAL_DATA_THRESHOLD,
    MIN_OPSET,
    PARITY_BATCH_SIZES,
)
from .parity import ParityReport
from .triton import TritonModel, check_triton_options, write_repository

logger = logging.getLogger(__name__)

Progress = Callable[[str, str], None]  # (step, message): step is load, trace, check, save, triton or done


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why and what to try. Nothing was written."""


class ParityError(ExportError):
    """The exported graph's logits differ from PyTorch's by more than the tolerance."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ExportReport:
    """What an export produced, with its parity figures and timings (seconds)."""

    output_path: Path
    name: str
    checkpoint_path: Path
    checkpoint_sha256: str
    input_format: str  # "raw" or "normalized"
    precision: str  # "fp32" or "fp16"
    opset: int
    exporter: str  # "dynamo" or "torchscript"
    num_parameters: int
    parity: ParityReport  # the gate: ONNX Runtime CPU against PyTorch fp32 eval
    file_size: int  # bytes of the .onnx file (plus its external data file, if any)
    timings: dict[str, float] = field(default_factory=dict)  # load, trace, check, save, triton, total
    parity_cuda: ParityReport | None = None  # fp16 only, where a CUDA provider works
    external_data_path: Path | None = None  # weights side file, for models over 2 GB
    triton_model_dir: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # what metadata_props hold


# --- the module that is traced ------------------------------------------------------------------


class ExportWrapper(nn.Module):
    """The classifier with the ONNX file's input handling in front and a float32 cast behind.

    ``raw``: ``uint8 [B, H, W, 3]`` -> float32, ``(x - 255 * mean) * (1 / (255 * std))`` -> NCHW: the
    arithmetic of ``stageformer.core.preprocess.normalize``, constants computed the same way in float32.
    ``normalized``: ``float32 [B, 3, H, W]`` as it comes. The model runs in ``dtype``; normalization
    always runs in float32.
    """

    def __init__(self, model: nn.Module, preprocess: PreprocessConfig, input_format: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.raw = input_format == "raw"
        self.dtype = dtype
        mean = np.asarray(preprocess.mean, dtype=np.float32) * np.float32(255.0)
        inv_std = np.float32(1.0) / (np.asarray(preprocess.std, dtype=np.float32) * np.float32(255.0))
        self.mean: Tensor
        self.inv_std: Tensor
        self.register_buffer("mean", torch.from_numpy(mean), persistent=False)
        self.register_buffer("inv_std", torch.from_numpy(inv_std), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        x = image
        if self.raw:
            x = ((x.to(torch.float32) - self.mean) * self.inv_std).permute(0, 3, 1, 2)  # NHWC -> NCHW
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        return self.model(x).to(torch.float32)


def to_fp16(model: nn.Module) -> nn.Module:
    """A half-precision copy. Derived tables kept out of checkpoints (non-persistent buffers: rotary
    frequencies, sine position tables) stay float32, as the layers cast them where they are used;
    rounding rotary frequencies to fp16 would shift the angles of far positions by radians."""
    half = copy.deepcopy(model)
    keep = {
        (module, name): buf
        for module in half.modules()
        for name, buf in module.named_buffers(recurse=False)
        if name in module._non_persistent_buffers_set and buf.is_floating_point()
    }
    half.half()
    for (module, name), buf in keep.items():
        setattr(module, name, buf)
    return half


# --- helpers ------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep torch.onnx's chatter (warnings, "torchvision is not installed") out of the user's terminal;
    it is logged at DEBUG instead."""
    noisy = logging.getLogger("torch.onnx")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            logger.debug("exporter warning: %s", w.message)
    finally:
        noisy.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def _check_options(
    checkpoint: Path,
    output: Path,
    input_format: str,
    opset: int,
    exporter: str,
    atol: float,
    name: str,
    triton_max_batch_size: int,
    triton_max_queue_delay_us: int,
    parity_batch_sizes: Sequence[int],
) -> None:
    if input_format not in INPUT_FORMATS:
        raise ExportError(f"input format {input_format!r} is not supported; choose one of {', '.join(INPUT_FORMATS)}")
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r} is not supported; choose one of {', '.join(EXPORTERS)}")
    highest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise ExportError(
            f"opset {opset!r} is out of range: torch.onnx writes opset {MIN_OPSET} and above, and the installed "
            f"onnx {onnx.__version__} goes up to {highest}; "
            f"the default {DEFAULT_OPSET} suits ONNX Runtime >= 1.17 and TensorRT"
        )
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise ExportError(f"atol must be a finite number >= 0, got {atol!r}")
    if not parity_batch_sizes or any(int(b) < 1 for b in parity_batch_sizes):
        raise ExportError(f"parity batch sizes must be positive integers, got {list(parity_batch_sizes)}")
    try:
        check_model_name(name)
        check_triton_options(triton_max_batch_size, triton_max_queue_delay_us)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if not checkpoint.is_file():
        raise ExportError(f"checkpoint {str(checkpoint)!r} does not exist")
    if output.exists() and output.is_dir():
        raise ExportError(f"output {str(output)!r} is a directory; give a file name such as model.onnx")
    if output.resolve() == checkpoint.resolve():
        raise ExportError("the output would overwrite the checkpoint; give another file name with -o")


# --- trace ----------------------------------------------------------------------------------------


def _trace_dynamo(wrapper: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim(BATCH_DIM, min=1)
    try:
        with _quiet_exporter():
            program = torch.export.export(wrapper, (example,), dynamic_shapes={INPUT_NAME: {0: batch}}, strict=False)
    except Exception as exc:
        raise ExportError(
            f"torch.export cannot trace the model: {_first_line(exc)}. Models exported to ONNX need a forward "
            "pass without data-dependent control flow; try --exporter torchscript"
        ) from exc
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                program,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(
            f"torch.onnx cannot translate the model to ONNX opset {opset}: {_first_line(exc)}; "
            "try another --opset or --exporter torchscript"
        ) from exc
    if onnx_program is None:  # pragma: no cover - torch returns a program when no file name is given
        raise ExportError("torch.onnx returned no model")
    return onnx_program.model_proto


def _trace_torchscript(wrapper: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="stageformer-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with _quiet_exporter(), torch.inference_mode():
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                    do_constant_folding=True,
                )
        except Exception as exc:
            raise ExportError(
                f"the TorchScript exporter cannot export the model at opset {opset}: {_first_line(exc)}; "
                "try --exporter dynamo"
            ) from exc
        return onnx.load(str(path))


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    """Size of the graph's weights, however each tensor stores them."""
    total = 0
    for t in proto.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def _check_signature(proto: onnx.ModelProto, input_format: str, image_size: int, num_classes: int) -> None:
    """The graph's input and output are what DESIGN.md promises, batch axis named ``batch``."""
    graph = proto.graph
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ExportError(
            f"the traced graph has inputs {[i.name for i in graph.input]} and outputs "
            f"{[o.name for o in graph.output]}, expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )
    if input_format == "raw":
        want_in, elem_in = [BATCH_DIM, image_size, image_size, 3], onnx.TensorProto.UINT8
    else:
        want_in, elem_in = [BATCH_DIM, 3, image_size, image_size], onnx.TensorProto.FLOAT
    for value, want, elem in (
        (graph.input[0], want_in, elem_in),
        (graph.output[0], [BATCH_DIM, num_classes], onnx.TensorProto.FLOAT),
    ):
        tensor = value.type.tensor_type
        dims = tensor.shape.dim
        if len(dims) != len(want):
            raise ExportError(f"{value.name} has rank {len(dims)}, expected {len(want)}")
        if not dims[0].dim_param:
            raise ExportError(
                f"{value.name}'s batch axis came out fixed at {dims[0].dim_value}; the model's forward pass must not "
                "depend on the batch size"
            )
        dims[0].dim_param = BATCH_DIM  # the exporters name it s0, s77 or batch; one name in every file
        got = [d.dim_param or d.dim_value for d in dims]
        if got != want or tensor.elem_type != elem:
            raise ExportError(
                f"{value.name} is {onnx.TensorProto.DataType.Name(tensor.elem_type)} {got}, expected "
                f"{onnx.TensorProto.DataType.Name(elem)} {want}"
            )


# --- ONNX Runtime ---------------------------------------------------------------------------------


def _session(model: bytes | str, providers: Sequence[str]) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, options, providers=list(providers))


def cuda_works() -> bool:
    """True when ONNX Runtime's CUDA provider really runs here: onnxruntime-gpu lists CUDA as available
    even without a GPU and then falls back to CPU, so a session is made and asked what it uses."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    probe.ir_version = 8
    try:
        session = _session(probe.SerializeToString(), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:  # any failure means "no CUDA here"
        return False
    return bool(session.get_providers()[0] == "CUDAExecutionProvider")


def _gate(
    model: bytes | str,
    reference: parity_lib.Reference,
    references: Sequence[np.ndarray],
    batches: Sequence[parity_lib.ParityBatch],
    input_format: str,
    preprocess: PreprocessConfig,
    atol: float,
    provider: str,
) -> ParityReport:
    """Load the graph on ``provider`` and compare it with PyTorch's logits on the parity batches."""
    where = f"ONNX Runtime {ort.__version__} ({provider})"
    try:
        session = _session(
            model, [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider]
        )
    except Exception as exc:
        raise ExportError(f"{where} cannot load the exported graph: {_first_line(exc)}") from exc
    try:
        return parity_lib.compare(
            parity_lib.session_runner(session),
            reference,
            batches,
            input_format,
            preprocess,
            atol,
            f"onnxruntime {ort.__version__} {provider}",
            f"pytorch {torch.__version__} fp32 eval",
            references,
        )
    except Exception as exc:
        raise ExportError(f"{where} cannot run the exported graph: {_first_line(exc)}") from exc


# --- save -----------------------------------------------------------------------------------------


def _set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _save_atomic(proto: onnx.ModelProto, output: Path, external: bool) -> Path | None:
    """Write ``output`` (and ``output.data`` for models over 2 GB) so that they appear only complete.
    Returns the external data path, if any."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        staged = staging / output.name
        data_name = output.name + ".data"
        if external:
            onnx.save_model(
                proto,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(staging / data_name, output.parent / data_name)
        else:
            onnx.save_model(proto, str(staged))
        os.replace(staged, output)
        return output.parent / data_name if external else None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- the pipeline ---------------------------------------------------------------------------------


class _Steps:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()
        self._step_start = self._start

    def done(self, step: str, message: str) -> None:
        now = time.perf_counter()
        line = message
        if step != "done":
            self.timings[step] = self.timings.get(step, 0.0) + now - self._step_start
            line = f"{message} ({self.timings[step]:.1f} s)"
        self._step_start = now
        if self.progress is not None:
            self.progress(step, line)
        else:
            logger.info("%s: %s", step, line)

    def total(self) -> float:
        self.timings["total"] = time.perf_counter() - self._start
        return self.timings["total"]


def _versions() -> dict[str, str]:
    from stageformer.core import __version__

    return {
        "stageformer_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
    }


def export_onnx(
    checkpoint_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    input: str = "raw",  # the CLI's --input; shadows the builtin inside this function only
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    atol: float | None = None,
    name: str | None = None,
    triton_repo: str | os.PathLike[str] | None = None,
    triton_max_batch_size: int = DEFAULT_TRITON_MAX_BATCH_SIZE,
    triton_max_queue_delay_us: int = DEFAULT_TRITON_QUEUE_DELAY_US,
    exporter: str = DEFAULT_EXPORTER,
    parity_batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    progress: Progress | None = None,
) -> ExportReport:
    """Export a checkpoint to a single-file ONNX model that passed the parity gate.

    ``input``: ``"raw"`` (``uint8 [batch, H, W, 3]``, normalization in the graph) or ``"normalized"``
    (``float32 [batch, 3, H, W]``). ``fp16``: weights and compute in half precision, input and output
    types unchanged. ``atol``: the largest allowed |logit difference| against PyTorch fp32 (default
    1e-4, or 5e-2 with ``fp16``). ``name``: the model's name (default: the checkpoint's file stem), used
    for the Triton directory. ``progress(step, message)`` receives one line per step; without it the
    steps are logged.

    Raises ``ExportError`` (``ParityError`` when the gate fails) with nothing written to ``output_path``
    or ``triton_repo``: for bad options, a checkpoint that cannot be loaded, a model that cannot be run,
    traced or loaded by ONNX Runtime, and logits that differ.
    """
    steps = _Steps(progress)
    checkpoint = Path(checkpoint_path)
    output = Path(output_path)
    input_format = input
    name = name if name is not None else checkpoint.stem
    tolerance = float(atol) if atol is not None else (DEFAULT_FP16_ATOL if fp16 else DEFAULT_ATOL)
    _check_options(
        checkpoint,
        output,
        input_format,
        opset,
        exporter,
        tolerance,
        name,
        triton_max_batch_size,
        triton_max_queue_delay_us,
        parity_batch_sizes,
    )

    # load ---------------------------------------------------------------------------------------
    try:
        ckpt: Checkpoint = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    config, preprocess = ckpt.config, ckpt.preprocess
    if config.num_classes < 1:
        raise ExportError(
            "the model has no classification head (num_classes=0) but an ONNX file returns logits "
            "[batch, num_classes]; export a checkpoint with classes"
        )
    digest = sha256_of(checkpoint)
    num_parameters = sum(p.numel() for p in ckpt.model.parameters())
    batches = parity_lib.parity_batches(preprocess.image_size, [int(b) for b in parity_batch_sizes])
    model = ckpt.model.eval()

    def reference(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(normalize(pixels, preprocess))).numpy()

    try:
        references = [reference(b.pixels) for b in batches]
    except Exception as exc:
        raise ExportError(f"PyTorch cannot run the model: {_first_line(exc)}") from exc
    if not all(np.all(np.isfinite(r)) for r in references):
        raise ExportError(
            "PyTorch's own logits contain NaN or inf on the parity images; the checkpoint's weights are broken"
        )
    steps.done(
        "load",
        f"{name}: {num_parameters / 1e6:.1f}M parameters, {preprocess.image_size}x{preprocess.image_size}, "
        f"{config.num_classes} classes, sha256 {digest[:12]}; PyTorch logits of {sum(b.batch_size for b in batches)} "
        "parity images",
    )

    # trace --------------------------------------------------------------------------------------
    dtype = torch.float16 if fp16 else torch.float32
    wrapper = ExportWrapper(to_fp16(model) if fp16 else model, preprocess, input_format, dtype).eval()
    example_pixels = np.concatenate([b.pixels for b in batches])[:2]
    if example_pixels.shape[0] < 2:  # a batch of 1 lets torch.export specialize the batch axis
        example_pixels = np.concatenate([example_pixels, example_pixels])
    example = torch.from_numpy(parity_lib.model_input(example_pixels, input_format, preprocess))
    proto = (_trace_dynamo if exporter == "dynamo" else _trace_torchscript)(wrapper, example, opset)
    del wrapper
    _check_signature(proto, input_format, preprocess.image_size, config.num_classes)
    proto.producer_name, proto.producer_version = "stageformer", _versions()["stageformer_version"]
    proto.graph.name = name
    proto.doc_string = f"stageformer model {name}: {config.num_classes}-class image classifier"
    weight_bytes = _initializer_bytes(proto)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    if not external:
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported graph is not valid ONNX: {_first_line(exc)}") from exc
    steps.done(
        "trace",
        f"torch.onnx {exporter} exporter, opset {opset}, {'fp16' if fp16 else 'fp32'}, {input_format} input: "
        f"{len(proto.graph.node)} nodes, {weight_bytes / 1e6:.1f} MB of weights",
    )

    # check --------------------------------------------------------------------------------------
    with contextlib.ExitStack() as stack:
        if external:  # ONNX Runtime cannot take a >2 GB model from memory: stage it in a temporary directory
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stageformer-export-")))
            onnx.save_model(copy.deepcopy(proto), str(tmp / "model.onnx"), save_as_external_data=True)
            model_source: bytes | str = str(tmp / "model.onnx")
        else:
            model_source = proto.SerializeToString()
        gate = functools.partial(
            _gate, model_source, reference, references, batches, input_format, preprocess, tolerance
        )
        report = gate("CPUExecutionProvider")
        cuda_report = gate("CUDAExecutionProvider") if fp16 and cuda_works() else None
    for checked in (report, cuda_report):
        if checked is not None and not checked.passed:
            steps.done("check", checked.summary())
            hint = (
                "fp16 rounding grows with the size of the activations: if the top-1 agreement is acceptable, "
                "loosen --atol; otherwise export without --fp16"
                if fp16
                else "a difference this large means the graph computes something else than PyTorch: "
                "try another --opset or --exporter"
            )
            raise ParityError(f"parity gate failed: {checked.summary()}. Nothing was written; {hint}", checked)
    steps.done("check", report.summary() + (f"; {cuda_report.summary()}" if cuda_report else ""))

    # save ---------------------------------------------------------------------------------------
    parity_figures = report.to_dict()
    if cuda_report is not None:
        parity_figures["cuda"] = cuda_report.to_dict()
    extra = {k: v for k, v in ckpt.metadata.items() if k not in (*CHECKPOINT_REQUIRED_KEYS, VERSION_KEY)}
    metadata = {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "name": name,
        "config": ckpt.metadata["config"],
        "preprocess": ckpt.metadata["preprocess"],
        "labels": ckpt.metadata["labels"],
        "input_format": input_format,
        "precision": "fp16" if fp16 else "fp32",
        "opset": str(opset),
        "exporter": exporter,
        "parity": json.dumps(parity_figures, sort_keys=True),
        "checkpoint_file": checkpoint.name,
        "checkpoint_sha256": digest,
        "checkpoint_metadata": json.dumps(extra, sort_keys=True),
        **_versions(),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _set_metadata(proto, metadata)
    external_path = _save_atomic(proto, output, external)
    size = output.stat().st_size + (external_path.stat().st_size if external_path else 0)
    steps.done(
        "save", f"wrote {output} ({size / 1e6:.1f} MB)" + (f" and {external_path.name}" if external_path else "")
    )

    # triton -------------------------------------------------------------------------------------
    triton_dir = None
    if triton_repo is not None:
        triton_model = TritonModel(
            name,
            input_format,
            preprocess.image_size,
            config.num_classes,
            triton_max_batch_size,
            triton_max_queue_delay_us,
        )
        triton_dir = write_repository(triton_repo, triton_model, output, ckpt.labels, external_path)
        steps.done("triton", f"wrote {triton_dir}/config.pbtxt, labels.txt, 1/model.onnx")

    total = steps.total()
    steps.done("done", f"exported {name} in {total:.1f} s")
    return ExportReport(
        output_path=output,
        name=name,
        checkpoint_path=checkpoint,
        checkpoint_sha256=digest,
        input_format=input_format,
        precision="fp16" if fp16 else "fp32",
        opset=opset,
        exporter=exporter,
        num_parameters=num_parameters,
        parity=report,
        file_size=size,
        timings=dict(steps.timings),
        parity_cuda=cuda_report,
        external_data_path=external_path,
        triton_model_dir=triton_dir,
        metadata=metadata,
    )


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict, without loading its weights."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


__all__ = [
    "ExportError",
    "ExportReport",
    "ExportWrapper",
    "ParityError",
    "cuda_works",
    "export_onnx",
    "read_onnx_metadata",
    "to_fp16",
]
