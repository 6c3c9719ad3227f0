"""int8 quantization of an exported graph for CPUs, and the gate that the quantized graph must pass.

Torch-free. ``quantize_int8`` runs ONNX Runtime's static quantization (``quantize_static``) in QDQ
format with the settings of ``INT8``: weights int8, symmetric, one scale per output channel; activations
uint8 with MinMax ranges calibrated on representative images. Only the MatMuls with a weight (the linear
layers, where a MetaFormer spends most of its time) are quantized; everything else stays float32:
convolutions (in PoolFormer only the patch embeddings: 13% of the multiply-adds of poolformer_s12 at 224,
but most of the int8 error, as their input is the unnormalized residual stream), the classifier head,
attention's activation-by-activation products, normalization, pooling, GELU and the residual additions.
ONNX Runtime's CPU provider fuses each DequantizeLinear -> MatMul into an integer matrix product. The
graph's input and output do not change: ``image`` and ``logits``, as in the fp32 file, so an int8 file
serves unchanged.

The gate (``check_agreement``) compares the quantized graph's logits with the PyTorch fp32 model's on
the calibration images and on the held-out ones: on each set, the fraction of images whose top-1 class
is the same must reach ``min_agreement``. The largest difference of the softmax probabilities and of the
logits are reported alongside. Top-1 agreement is the figure that matters for a classifier: int8 logits
are not within a small tolerance of fp32 ones, and need not be.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stageformer.core.formats import INPUT_NAME
from stageformer.core.scores import softmax

from .calibration import CalibrationImages
from .options import CALIBRATION_BATCH_SIZE

logger = logging.getLogger(__name__)

Run = Callable[[np.ndarray], np.ndarray]  # model input batch -> logits


@dataclass(frozen=True)
class QuantizationSettings:
    """What ``quantize_static`` is asked for; stored in the file's metadata."""

    op_types: tuple[str, ...]  # operator types whose inputs are quantized
    weight_matmuls_only: bool  # MatMuls only where the second input is a weight: not attention's products
    calibration_method: str  # onnxruntime.quantization.CalibrationMethod name
    per_channel: bool  # one weight scale per output channel
    reduce_range: bool  # 7-bit weights, for CPUs without VNNI that could overflow
    activation_symmetric: bool
    quant_format: str = "QDQ"
    activation_type: str = "uint8"
    weight_type: str = "int8"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["op_types"] = list(self.op_types)
        return data


# How these were chosen, against the alternatives (Conv and Gemm too, Add and Mul, reduce_range, symmetric or
# int8 activations, per-tensor weights, Entropy and Percentile calibration, quant_pre_process): docs/export.md.
INT8 = QuantizationSettings(
    op_types=("MatMul",),
    weight_matmuls_only=True,
    calibration_method="MinMax",
    per_channel=True,
    reduce_range=False,
    activation_symmetric=False,
)


class _Batches:
    """A ``CalibrationDataReader``: the calibration inputs in batches, as ``{input name: batch}``."""

    def __init__(self, inputs: np.ndarray, batch_size: int) -> None:
        self._batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return {INPUT_NAME: self._batches.pop(0)} if self._batches else None


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """``quantize_static`` logs advice through the root logger (a pre-processing hint); keep it at DEBUG."""
    root = logging.getLogger()

    class _ToDebug(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.name == "root" and record.levelno < logging.ERROR:
                logger.debug("onnxruntime.quantization: %s", record.getMessage())
                return False
            return True

    quiet = _ToDebug()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def activation_matmuls(source: Path) -> list[str]:
    """Names of the MatMul nodes of the graph at ``source`` whose second input is not a weight (attention's
    query-key and attention-value products). ``quantize_static``'s ``MatMulConstBOnly`` option is not
    applied in QDQ format, so these are excluded by name."""
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


def quantize_int8(
    source: Path,
    target: Path,
    calibration_inputs: np.ndarray,
    settings: QuantizationSettings = INT8,
    external_data: bool = False,
) -> None:
    """Quantize the fp32 graph at ``source`` into ``target``, calibrating on ``calibration_inputs`` (what the
    graph takes: uint8 pixels or normalized float32). ``external_data`` keeps weights in a side file."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    exclude = activation_matmuls(source) if settings.weight_matmuls_only else []
    with _quiet_quantizer():
        quantize_static(
            str(source),
            str(target),
            _Batches(calibration_inputs, CALIBRATION_BATCH_SIZE),
            quant_format=QuantFormat[settings.quant_format],
            op_types_to_quantize=list(settings.op_types),
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=QuantType.QUInt8 if settings.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[settings.calibration_method],
            nodes_to_exclude=exclude,
            use_external_data_format=external_data,
            extra_options={"ActivationSymmetric": settings.activation_symmetric},
        )


# --- the gate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """The quantized graph against the fp32 reference on one set of images."""

    images: int
    top1_agreement: float  # fraction of images with the same arg-max class
    max_abs_softmax_diff: float  # largest |p_int8 - p_fp32| over images and classes
    mean_abs_softmax_diff: float
    max_abs_logit_diff: float


def agreement(got: np.ndarray, expected: np.ndarray) -> Agreement:
    """Compare two ``[N, num_classes]`` logit arrays; non-finite logits count as disagreeing everywhere."""
    if got.shape != expected.shape:
        raise ValueError(f"the quantized graph returned shape {list(got.shape)}, PyTorch {list(expected.shape)}")
    if not np.all(np.isfinite(got)):
        return Agreement(len(got), 0.0, math.inf, math.inf, math.inf)
    same = got.argmax(axis=-1) == expected.argmax(axis=-1)
    dp = np.abs(softmax(got) - softmax(expected))
    return Agreement(
        images=len(got),
        top1_agreement=float(same.mean()),
        max_abs_softmax_diff=float(dp.max()),
        mean_abs_softmax_diff=float(dp.mean()),
        max_abs_logit_diff=float(np.abs(got.astype(np.float64) - expected).max()),
    )


@dataclass(frozen=True)
class QuantizationReport:
    """The settings, where the calibration images came from and the gate's figures; ``to_dict`` is what the
    ONNX metadata stores under ``quantization``."""

    settings: QuantizationSettings
    min_agreement: float
    calibration: Agreement  # the images the ranges were computed from
    held_out: Agreement  # images of the same folder kept out of calibration
    calibration_folder: str  # the folder's name
    skipped_files: int  # image files of the folder that could not be read
    runtime: str  # e.g. "onnxruntime 1.32.0 CPUExecutionProvider"
    reference: str  # e.g. "pytorch 2.13.0 fp32 eval"

    @property
    def passed(self) -> bool:
        return all(s.top1_agreement >= self.min_agreement for s in (self.calibration, self.held_out))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = self.settings.to_dict()
        data["passed"] = self.passed
        for figures in (data["calibration"], data["held_out"]):  # JSON has no inf
            for key, value in figures.items():
                if isinstance(value, float) and not math.isfinite(value):
                    figures[key] = str(value)
        return data

    def summary(self) -> str:
        def part(name: str, s: Agreement) -> str:
            return f"{name} {s.top1_agreement:.1%} of {s.images}"

        relation = ">=" if self.passed else "<"
        worst = max(self.calibration.max_abs_softmax_diff, self.held_out.max_abs_softmax_diff)
        return (
            f"int8 top-1 agreement with PyTorch fp32: {part('calibration', self.calibration)}, "
            f"{part('held-out', self.held_out)} {relation} {self.min_agreement:.1%}; max |softmax diff| {worst:.3g}; "
            f"{self.runtime}: {'ok' if self.passed else 'FAILED'}"
        )


def run_batched(run: Run, inputs: np.ndarray, batch_size: int = CALIBRATION_BATCH_SIZE) -> np.ndarray:
    """``run`` over ``inputs`` in batches, the logits concatenated."""
    return np.concatenate([np.asarray(run(inputs[i : i + batch_size])) for i in range(0, len(inputs), batch_size)])


def check_agreement(
    run: Run,
    images: CalibrationImages,
    inputs: np.ndarray,
    references: np.ndarray,
    settings: QuantizationSettings,
    min_agreement: float,
    runtime: str,
    reference: str,
) -> QuantizationReport:
    """Run the quantized graph (``run``) on ``inputs`` (the graph's input for each of ``images``) and compare
    with ``references`` (the fp32 logits of the same images), calibration and held-out images apart."""
    got = run_batched(run, inputs)
    held = images.held_out
    return QuantizationReport(
        settings=settings,
        min_agreement=min_agreement,
        calibration=agreement(got[~held], references[~held]),
        held_out=agreement(got[held], references[held]),
        calibration_folder=images.folder.name,
        skipped_files=len(images.skipped),
        runtime=runtime,
        reference=reference,
    )
