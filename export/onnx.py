"""Checkpoint -> ONNX file: trace, parity gate, optional int8 quantization, metadata, atomic save, Triton.

``export_onnx`` is the whole pipeline, one function per step, each reported through ``progress`` (or
logged):

- load: read the checkpoint, hash it, run the model once in PyTorch (a model that cannot run or gives
  NaN fails here, before anything is traced or written); with ``quantize="int8"``, also read the
  calibration images;
- trace: ``torch.export`` + ``torch.onnx`` (dynamo exporter, opset 20 by default) of the model wrapped
  with its input handling: ``uint8 [batch, H, W, 3]`` normalized inside the graph (``raw``) or
  ``float32 [batch, 3, H, W]`` (``normalized``); ``float32 [batch, num_classes]`` logits out
  (``export.trace``);
- check: ONNX Runtime (CPU) against PyTorch eval on seeded real-looking and random images at batch
  sizes 1, 3 and 8 (``export.parity``); a difference above ``atol`` fails the export;
- quantize (int8 only): ONNX Runtime static quantization of the checked fp32 graph, calibrated on the
  images, then its own gate: top-1 agreement with PyTorch fp32 on the calibration and held-out images
  (``export.quantize``);
- save: metadata (config, preprocessing, labels, provenance, gate figures) into ``metadata_props``,
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from model import Checkpoint, CheckpointError, load_checkpoint
from stageformer.core.formats import (
    CHECKPOINT_REQUIRED_KEYS,
    CONFIG_KEY,
    FORMAT_KEY,
    FORMAT_VERSION_KEY,
    INPUT_FORMAT_KEY,
    INPUT_FORMATS,
    LABELS_KEY,
    NAME_KEY,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    PARITY_KEY,
    PRECISION_KEY,
    PREPROCESS_KEY,
    QUANTIZATION_KEY,
    VERSION_KEY,
)
from stageformer.core.naming import check_model_name
from stageformer.core.preprocess import normalize

from . import parity as parity_lib
from .calibration import CalibrationImages, read_calibration_images
from .errors import AgreementError, ExportError, ParityError
from .options import (
    CALIBRATION_BATCH_SIZE,
    DEFAULT_ATOL,
    DEFAULT_EXPORTER,
    DEFAULT_FP16_ATOL,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_OPSET,
    DEFAULT_TRITON_MAX_BATCH_SIZE,
    DEFAULT_TRITON_QUEUE_DELAY_US,
    EXPORTERS,
    EXTERNAL_DATA_THRESHOLD,
    MIN_OPSET,
    PARITY_BATCH_SIZES,
    QUANTIZE_CHOICES,
)
from .parity import ParityReport
from .quantize import INT8 as INT8_SETTINGS
from .quantize import QuantizationReport, check_agreement, quantize_int8, run_batched
from .trace import ExportWrapper, check_signature, first_line, initializer_bytes, to_fp16, trace
from .triton import TritonModel, check_triton_options, write_repository

logger = logging.getLogger(__name__)

# (step, message): step is load, trace, check, quantize, save, triton or done
Progress = Callable[[str, str], None]

FP32, FP16, INT8 = "fp32", "fp16", "int8"


@dataclass(frozen=True)
class ExportReport:
    """What an export produced, with its gate figures and timings (seconds)."""

    output_path: Path
    name: str
    checkpoint_path: Path
    checkpoint_sha256: str
    input_format: str  # "raw" or "normalized"
    precision: str  # "fp32", "fp16" or "int8"
    opset: int
    exporter: str  # "dynamo" or "torchscript"
    num_parameters: int
    parity: ParityReport  # the gate: ONNX Runtime CPU against PyTorch fp32 eval (for int8: the fp32 graph)
    file_size: int  # bytes of the .onnx file (plus its external data file, if any)
    timings: dict[str, float] = field(default_factory=dict)  # load, trace, check, [quantize,] save, triton, total
    parity_cuda: ParityReport | None = None  # fp16 only, where a CUDA provider works
    external_data_path: Path | None = None  # weights side file, for models over 2 GB
    triton_model_dir: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # what metadata_props hold
    quantization: QuantizationReport | None = None  # int8 only: settings and the agreement gate's figures


# --- helpers ------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Steps:
    """Times the steps and reports each as it ends, through ``progress`` or the log."""

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
        VERSION_KEY: __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
    }


def _pytorch_name() -> str:
    return f"pytorch {torch.__version__} fp32 eval"


# --- options --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """``export_onnx``'s arguments, defaults resolved."""

    checkpoint: Path
    output: Path
    input_format: str
    opset: int
    exporter: str
    precision: str  # fp32, fp16 or int8
    atol: float  # for the graph before quantization
    name: str
    parity_batch_sizes: tuple[int, ...]
    triton_repo: Path | None
    triton_max_batch_size: int
    triton_max_queue_delay_us: int
    calibration: Path | None
    min_agreement: float


def _precision(fp16: bool, quantize: str | None) -> str:
    if quantize is None:
        return FP16 if fp16 else FP32
    if quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"quantize {quantize!r} is not supported; choose {', '.join(QUANTIZE_CHOICES)}")
    if fp16:
        raise ExportError(
            "--quantize int8 and --fp16 exclude each other: int8 is quantized from the fp32 graph, for CPUs; "
            "fp16 is for GPUs. Drop one of them"
        )
    return INT8


def _check_graph_options(options: _Options) -> None:
    if options.input_format not in INPUT_FORMATS:
        raise ExportError(
            f"input format {options.input_format!r} is not supported; choose one of {', '.join(INPUT_FORMATS)}"
        )
    if options.exporter not in EXPORTERS:
        raise ExportError(f"exporter {options.exporter!r} is not supported; choose one of {', '.join(EXPORTERS)}")
    opset, highest = options.opset, onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise ExportError(
            f"opset {opset!r} is out of range: torch.onnx writes opset {MIN_OPSET} and above, and the installed "
            f"onnx {onnx.__version__} goes up to {highest}; "
            f"the default {DEFAULT_OPSET} suits ONNX Runtime >= 1.17 and TensorRT"
        )
    atol = options.atol
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise ExportError(f"atol must be a finite number >= 0, got {atol!r}")
    if not options.parity_batch_sizes or any(b < 1 for b in options.parity_batch_sizes):
        raise ExportError(f"parity batch sizes must be positive integers, got {list(options.parity_batch_sizes)}")
    try:
        check_model_name(options.name)
        check_triton_options(options.triton_max_batch_size, options.triton_max_queue_delay_us)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def _check_quantize_options(options: _Options) -> None:
    if options.precision != INT8:
        if options.calibration is not None:
            raise ExportError("calibration images are only used with --quantize int8; add it or drop --calibration")
        return
    if options.calibration is None:
        raise ExportError(
            "--quantize int8 needs --calibration DIR: a folder of representative images (a few hundred, any "
            "format and size) from which the int8 ranges are computed"
        )
    if not options.calibration.is_dir():
        raise ExportError(f"calibration folder {str(options.calibration)!r} does not exist or is not a folder")
    agree = options.min_agreement
    if isinstance(agree, bool) or not isinstance(agree, (int, float)) or not 0.0 <= agree <= 1.0:
        raise ExportError(f"min agreement must be a fraction between 0 and 1 (0.99 is 99%), got {agree!r}")


def _check_options(options: _Options) -> None:
    """Raise ``ExportError`` for the first option that cannot work, before anything is loaded."""
    _check_graph_options(options)
    _check_quantize_options(options)
    _check_paths(options)


def _check_paths(options: _Options) -> None:
    checkpoint, output = options.checkpoint, options.output
    if not checkpoint.is_file():
        raise ExportError(f"checkpoint {str(checkpoint)!r} does not exist")
    if output.exists() and output.is_dir():
        raise ExportError(f"output {str(output)!r} is a directory; give a file name such as model.onnx")
    if output.resolve() == checkpoint.resolve():
        raise ExportError("the output would overwrite the checkpoint; give another file name with -o")


# --- load -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    """The checkpoint, its PyTorch reference and the images the gates run on."""

    checkpoint: Checkpoint
    digest: str
    num_parameters: int
    reference: parity_lib.Reference  # uint8 pixels -> PyTorch fp32 logits
    batches: list[parity_lib.ParityBatch]
    references: list[np.ndarray]  # PyTorch's logits of ``batches``
    calibration: CalibrationImages | None  # int8 only


def _read_checkpoint(path: Path) -> Checkpoint:
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    if ckpt.config.num_classes < 1:
        raise ExportError(
            "the model has no classification head (num_classes=0) but an ONNX file returns logits "
            "[batch, num_classes]; export a checkpoint with classes"
        )
    ckpt.model.eval()
    return ckpt


def _pytorch_reference(ckpt: Checkpoint) -> parity_lib.Reference:
    model, preprocess = ckpt.model, ckpt.preprocess

    def reference(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(normalize(pixels, preprocess))).numpy()

    return reference


def _reference_logits(reference: parity_lib.Reference, batches: Sequence[parity_lib.ParityBatch]) -> list[np.ndarray]:
    try:
        references = [reference(b.pixels) for b in batches]
    except Exception as exc:
        raise ExportError(f"PyTorch cannot run the model: {first_line(exc)}") from exc
    if not all(np.all(np.isfinite(r)) for r in references):
        raise ExportError(
            "PyTorch's own logits contain NaN or inf on the parity images; the checkpoint's weights are broken"
        )
    return references


def _load(options: _Options, steps: _Steps) -> _Loaded:
    """Read the checkpoint (and the calibration images) and compute PyTorch's logits of the parity images."""
    ckpt = _read_checkpoint(options.checkpoint)
    preprocess = ckpt.preprocess
    digest = sha256_of(options.checkpoint)
    num_parameters = sum(p.numel() for p in ckpt.model.parameters())
    batches = parity_lib.parity_batches(preprocess.image_size, options.parity_batch_sizes)
    reference = _pytorch_reference(ckpt)
    references = _reference_logits(reference, batches)
    calibration = None
    if options.calibration is not None:
        calibration = read_calibration_images(options.calibration, preprocess)
    steps.done(
        "load",
        f"{options.name}: {num_parameters / 1e6:.1f}M parameters, {preprocess.image_size}x{preprocess.image_size}, "
        f"{ckpt.config.num_classes} classes, sha256 {digest[:12]}; PyTorch logits of "
        f"{sum(b.batch_size for b in batches)} parity images"
        + (
            f"; {len(calibration.names)} calibration images ({int(calibration.held_out.sum())} held out)"
            if calibration is not None
            else ""
        ),
    )
    return _Loaded(ckpt, digest, num_parameters, reference, batches, references, calibration)


# --- trace ----------------------------------------------------------------------------------------


def _stamp(proto: onnx.ModelProto, options: _Options, num_classes: int) -> None:
    """The producer, graph name and description every stageformer file carries."""
    proto.producer_name, proto.producer_version = "stageformer", _versions()[VERSION_KEY]
    proto.graph.name = options.name
    proto.doc_string = f"stageformer model {options.name}: {num_classes}-class image classifier"


def _external(proto: onnx.ModelProto) -> bool:
    """Whether the weights are too large for one protobuf file (2 GB) and go to a side file."""
    return initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD


def _trace(options: _Options, loaded: _Loaded, steps: _Steps) -> onnx.ModelProto:
    """The model, wrapped with its input handling (and cast to fp16 if asked), as a checked ONNX graph."""
    ckpt, fp16 = loaded.checkpoint, options.precision == FP16
    model = to_fp16(ckpt.model) if fp16 else ckpt.model
    wrapper = ExportWrapper(model, ckpt.preprocess, options.input_format, torch.float16 if fp16 else torch.float32)
    example_pixels = np.concatenate([b.pixels for b in loaded.batches])[:2]
    if example_pixels.shape[0] < 2:  # a batch of 1 lets torch.export specialize the batch axis
        example_pixels = np.concatenate([example_pixels, example_pixels])
    example = torch.from_numpy(parity_lib.model_input(example_pixels, options.input_format, ckpt.preprocess))
    proto = trace(wrapper.eval(), example, options.opset, options.exporter)
    del wrapper, model
    check_signature(proto, options.input_format, ckpt.preprocess.image_size, ckpt.config.num_classes)
    _stamp(proto, options, ckpt.config.num_classes)
    if not _external(proto):
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported graph is not valid ONNX: {first_line(exc)}") from exc
    steps.done(
        "trace",
        f"torch.onnx {options.exporter} exporter, opset {options.opset}, {FP16 if fp16 else FP32}, "
        f"{options.input_format} input: {len(proto.graph.node)} nodes, {initializer_bytes(proto) / 1e6:.1f} MB of "
        "weights",
    )
    return proto


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


def _save_model(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write ``proto`` to ``path``; with ``external``, its weights to ``path.name + ".data"`` beside it."""
    if external:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(path))


@contextlib.contextmanager
def _runnable(proto: onnx.ModelProto) -> Iterator[bytes | str]:
    """What ``InferenceSession`` takes for ``proto``: its bytes, or for a model over 2 GB (which ONNX Runtime
    cannot take from memory) the path of a copy staged in a temporary directory."""
    if not _external(proto):
        yield proto.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="stageformer-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        _save_model(copy.deepcopy(proto), path, external=True)
        yield str(path)


def _open_session(model: bytes | str, provider: str) -> Any:
    where = f"ONNX Runtime {ort.__version__} ({provider})"
    providers = [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider]
    try:
        return _session(model, providers)
    except Exception as exc:
        raise ExportError(f"{where} cannot load the exported graph: {first_line(exc)}") from exc


# --- check ----------------------------------------------------------------------------------------


def _gate(model: bytes | str, options: _Options, loaded: _Loaded, provider: str) -> ParityReport:
    """Load the graph on ``provider`` and compare it with PyTorch's logits on the parity batches."""
    session = _open_session(model, provider)
    where = f"ONNX Runtime {ort.__version__} ({provider})"
    try:
        return parity_lib.compare(
            parity_lib.session_runner(session),
            loaded.reference,
            loaded.batches,
            options.input_format,
            loaded.checkpoint.preprocess,
            options.atol,
            f"onnxruntime {ort.__version__} {provider}",
            _pytorch_name(),
            loaded.references,
        )
    except Exception as exc:
        raise ExportError(f"{where} cannot run the exported graph: {first_line(exc)}") from exc


def _check(
    options: _Options, loaded: _Loaded, proto: onnx.ModelProto, steps: _Steps
) -> tuple[ParityReport, ParityReport | None]:
    """The parity gate on CPU (and for fp16, on CUDA where it works); raises ``ParityError`` when it fails."""
    fp16 = options.precision == FP16
    with _runnable(proto) as model:
        gate = functools.partial(_gate, model, options, loaded)
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
    return report, cuda_report


# --- quantize -------------------------------------------------------------------------------------


def _quantized(proto: onnx.ModelProto, inputs: np.ndarray) -> onnx.ModelProto:
    """``proto`` quantized to int8 by ONNX Runtime, calibrated on ``inputs`` (the graph's input)."""
    external = _external(proto)
    with tempfile.TemporaryDirectory(prefix="stageformer-quantize-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        _save_model(proto, source, external)
        try:
            quantize_int8(source, target, inputs, external_data=external)
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot quantize the graph: {first_line(exc)}") from exc
        return onnx.load(str(target))  # external data, if any, is read into memory here


def _quantize(
    options: _Options, loaded: _Loaded, proto: onnx.ModelProto, steps: _Steps
) -> tuple[onnx.ModelProto, QuantizationReport]:
    """The int8 graph and its gate's figures; raises ``AgreementError`` when the gate fails."""
    images, ckpt = loaded.calibration, loaded.checkpoint
    assert images is not None  # _check_quantize_options made sure
    inputs = parity_lib.model_input(images.pixels, options.input_format, ckpt.preprocess)
    references = run_batched(loaded.reference, images.pixels, CALIBRATION_BATCH_SIZE)
    quantized = _quantized(proto, inputs[~images.held_out])
    check_signature(quantized, options.input_format, ckpt.preprocess.image_size, ckpt.config.num_classes)
    _stamp(quantized, options, ckpt.config.num_classes)
    runtime = f"onnxruntime {ort.__version__} CPUExecutionProvider"
    with _runnable(quantized) as model:
        run = parity_lib.session_runner(_open_session(model, "CPUExecutionProvider"))
        try:
            report = check_agreement(
                run, images, inputs, references, INT8_SETTINGS, options.min_agreement, runtime, _pytorch_name()
            )
        except Exception as exc:
            raise ExportError(f"{runtime} cannot run the int8 graph: {first_line(exc)}") from exc
    steps.done("quantize", report.summary())
    if not report.passed:
        raise AgreementError(
            f"int8 gate failed: {report.summary()}. Nothing was written; if the calibration images are "
            "representative and this agreement is acceptable, lower --min-agreement; otherwise serve the fp32 file",
            report,
        )
    return quantized, report


# --- save -----------------------------------------------------------------------------------------


def _metadata(
    options: _Options,
    loaded: _Loaded,
    parity: ParityReport,
    parity_cuda: ParityReport | None,
    quantization: QuantizationReport | None,
) -> dict[str, str]:
    """What the file's ``metadata_props`` hold; the keys the server reads are ``stageformer.core.formats``'."""
    ckpt_meta = loaded.checkpoint.metadata
    parity_figures = parity.to_dict()
    if parity_cuda is not None:
        parity_figures["cuda"] = parity_cuda.to_dict()
    extra = {k: v for k, v in ckpt_meta.items() if k not in (*CHECKPOINT_REQUIRED_KEYS, VERSION_KEY)}
    metadata = {
        FORMAT_KEY: ONNX_FORMAT,
        FORMAT_VERSION_KEY: str(ONNX_FORMAT_VERSION),
        NAME_KEY: options.name,
        CONFIG_KEY: ckpt_meta[CONFIG_KEY],
        PREPROCESS_KEY: ckpt_meta[PREPROCESS_KEY],
        LABELS_KEY: ckpt_meta[LABELS_KEY],
        INPUT_FORMAT_KEY: options.input_format,
        PRECISION_KEY: options.precision,
        "opset": str(options.opset),
        "exporter": options.exporter,
        PARITY_KEY: json.dumps(parity_figures, sort_keys=True),
        "checkpoint_file": options.checkpoint.name,
        "checkpoint_sha256": loaded.digest,
        "checkpoint_metadata": json.dumps(extra, sort_keys=True),
        **_versions(),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if quantization is not None:
        metadata[QUANTIZATION_KEY] = json.dumps(quantization.to_dict(), sort_keys=True)
    return metadata


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
        _save_model(proto, staged, external)
        if external:
            os.replace(staging / data_name, output.parent / data_name)
        os.replace(staged, output)
        return output.parent / data_name if external else None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save(proto: onnx.ModelProto, output: Path, metadata: dict[str, str], steps: _Steps) -> tuple[Path | None, int]:
    """Write the file with its metadata; returns the external data path (if any) and the bytes written."""
    _set_metadata(proto, metadata)
    external_path = _save_atomic(proto, output, _external(proto))
    size = output.stat().st_size + (external_path.stat().st_size if external_path else 0)
    steps.done(
        "save", f"wrote {output} ({size / 1e6:.1f} MB)" + (f" and {external_path.name}" if external_path else "")
    )
    return external_path, size


def _write_triton(options: _Options, loaded: _Loaded, external_path: Path | None, steps: _Steps) -> Path | None:
    """The Triton repository entry, when ``triton_repo`` is given; returns its model directory."""
    if options.triton_repo is None:
        return None
    ckpt = loaded.checkpoint
    triton_model = TritonModel(
        options.name,
        options.input_format,
        ckpt.preprocess.image_size,
        ckpt.config.num_classes,
        options.triton_max_batch_size,
        options.triton_max_queue_delay_us,
    )
    triton_dir = write_repository(options.triton_repo, triton_model, options.output, ckpt.labels, external_path)
    steps.done("triton", f"wrote {triton_dir}/config.pbtxt, labels.txt, 1/model.onnx")
    return triton_dir


# --- the pipeline ---------------------------------------------------------------------------------


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
    quantize: str | None = None,
    calibration: str | os.PathLike[str] | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    progress: Progress | None = None,
) -> ExportReport:
    """Export a checkpoint to a single-file ONNX model that passed the parity gate.

    ``input``: ``"raw"`` (``uint8 [batch, H, W, 3]``, normalization in the graph) or ``"normalized"``
    (``float32 [batch, 3, H, W]``). ``fp16``: weights and compute in half precision, input and output
    types unchanged. ``atol``: the largest allowed |logit difference| against PyTorch fp32 (default
    1e-4, or 5e-2 with ``fp16``). ``name``: the model's name (default: the checkpoint's file stem), used
    for the Triton directory. ``quantize="int8"``: the checked graph quantized for CPUs, calibrated on the
    images in the folder ``calibration``, written only if its top-1 classes agree with PyTorch fp32's on at
    least ``min_agreement`` of the calibration images and of the held-out ones. ``progress(step, message)``
    receives one line per step; without it the steps are logged.

    Raises ``ExportError`` (``ParityError`` or ``AgreementError`` when a gate fails) with nothing written to
    ``output_path`` or ``triton_repo``: for bad options, a checkpoint that cannot be loaded, a model that
    cannot be run, traced, quantized or loaded by ONNX Runtime, and predictions that differ.
    """
    steps = _Steps(progress)
    options = _Options(
        checkpoint=Path(checkpoint_path),
        output=Path(output_path),
        input_format=input,
        opset=opset,
        exporter=exporter,
        precision=_precision(fp16, quantize),
        atol=float(atol) if atol is not None else (DEFAULT_FP16_ATOL if fp16 else DEFAULT_ATOL),
        name=name if name is not None else Path(checkpoint_path).stem,
        parity_batch_sizes=tuple(int(b) for b in parity_batch_sizes),
        triton_repo=Path(triton_repo) if triton_repo is not None else None,
        triton_max_batch_size=triton_max_batch_size,
        triton_max_queue_delay_us=triton_max_queue_delay_us,
        calibration=Path(calibration) if calibration is not None else None,
        min_agreement=min_agreement,
    )
    _check_options(options)

    loaded = _load(options, steps)
    proto = _trace(options, loaded, steps)
    parity, parity_cuda = _check(options, loaded, proto, steps)
    proto, quantization = _quantize(options, loaded, proto, steps) if options.precision == INT8 else (proto, None)
    metadata = _metadata(options, loaded, parity, parity_cuda, quantization)
    external_path, size = _save(proto, options.output, metadata, steps)
    triton_dir = _write_triton(options, loaded, external_path, steps)
    steps.done("done", f"exported {options.name} in {steps.total():.1f} s")
    return ExportReport(
        output_path=options.output,
        name=options.name,
        checkpoint_path=options.checkpoint,
        checkpoint_sha256=loaded.digest,
        input_format=options.input_format,
        precision=options.precision,
        opset=options.opset,
        exporter=options.exporter,
        num_parameters=loaded.num_parameters,
        parity=parity,
        file_size=size,
        timings=dict(steps.timings),
        parity_cuda=parity_cuda,
        external_data_path=external_path,
        triton_model_dir=triton_dir,
        metadata=metadata,
        quantization=quantization,
    )


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict, without loading its weights."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


__all__ = [
    "AgreementError",
    "ExportError",
    "ExportReport",
    "ExportWrapper",
    "ParityError",
    "cuda_works",
    "export_onnx",
    "read_onnx_metadata",
    "to_fp16",
]
