"""Tracing: the PyTorch classifier, with the ONNX file's input handling in front, to an ONNX graph.

``trace`` runs ``torch.export`` + ``torch.onnx`` (the dynamo exporter) or the TorchScript exporter and
checks that the graph's one input and one output are what every stageformer ONNX file has: ``image``
(``uint8 [batch, H, W, 3]``, or ``float32 [batch, 3, H, W]`` for ``normalized`` input) and ``logits``
(``float32 [batch, num_classes]``), the batch axis named ``batch``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from stageformer.core.formats import INPUT_NAME, OUTPUT_NAME, RAW_INPUT
from stageformer.core.preprocess import PreprocessConfig

from .errors import ExportError
from .options import BATCH_DIM

logger = logging.getLogger(__name__)


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
        self.raw = input_format == RAW_INPUT
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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 500 characters), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def _trace_dynamo(wrapper: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim(BATCH_DIM, min=1)
    try:
        with _quiet_exporter():
            program = torch.export.export(wrapper, (example,), dynamic_shapes={INPUT_NAME: {0: batch}}, strict=False)
    except Exception as exc:
        raise ExportError(
            f"torch.export cannot trace the model: {first_line(exc)}. Models exported to ONNX need a forward "
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
            f"torch.onnx cannot translate the model to ONNX opset {opset}: {first_line(exc)}; "
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
                f"the TorchScript exporter cannot export the model at opset {opset}: {first_line(exc)}; "
                "try --exporter dynamo"
            ) from exc
        return onnx.load(str(path))


def trace(wrapper: nn.Module, example: Tensor, opset: int, exporter: str) -> onnx.ModelProto:
    """The ONNX graph of ``wrapper`` on inputs shaped like ``example``, batch axis dynamic; ``exporter`` is
    ``dynamo`` or ``torchscript``."""
    return (_trace_dynamo if exporter == "dynamo" else _trace_torchscript)(wrapper, example, opset)


def initializer_bytes(proto: onnx.ModelProto) -> int:
    """Size of the graph's weights, however each tensor stores them."""
    total = 0
    for t in proto.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def check_signature(proto: onnx.ModelProto, input_format: str, image_size: int, num_classes: int) -> None:
    """The graph's input and output are those of every stageformer ONNX file; the batch axis is renamed ``batch``."""
    graph = proto.graph
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ExportError(
            f"the graph has inputs {[i.name for i in graph.input]} and outputs "
            f"{[o.name for o in graph.output]}, expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )
    if input_format == RAW_INPUT:
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
