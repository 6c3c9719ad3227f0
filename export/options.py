"""Defaults and names of the export, in one torch-free place (the CLI builds its parser from them
without importing torch)."""

from __future__ import annotations

import re

# Opset 20 is what torch 2.13's exporter emits by default: GELU and LayerNormalization are single
# ONNX ops there, every ONNX Runtime from 1.17 on runs it (CPU and CUDA), and so does TensorRT 10.
# Opset 23 adds the fused ``Attention`` op, but needs ONNX Runtime >= 1.23 (Triton images ship
# older ones) and was no faster on CPU in our measurements.
DEFAULT_OPSET = 20
MIN_OPSET = 18  # torch.onnx's dynamo exporter writes opset 18 and above
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"

INPUT_FORMATS = ("raw", "normalized")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"

DEFAULT_ATOL = 1e-4  # max |logit difference| between ONNX Runtime and PyTorch, fp32 graph
DEFAULT_FP16_ATOL = 5e-2  # the same for an fp16 graph against the fp32 PyTorch model
PARITY_BATCH_SIZES = (1, 3, 8)
PARITY_SEED = 0

DEFAULT_TRITON_MAX_BATCH_SIZE = 32
DEFAULT_TRITON_QUEUE_DELAY_US = 1000

# Files of 2 GiB and more cannot be one protobuf: their weights go to a side file ``<model>.onnx.data``.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000

ONNX_FORMAT = "stageformer.onnx"
ONNX_FORMAT_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_model_name(name: str) -> str:
    """A model name is a directory of a Triton repository and a URL path segment of the server:
    letters, digits, ``_``, ``.`` and ``-``, not starting with ``.`` or ``-``."""
    if not _NAME.match(name):
        raise ValueError(
            f"model name {name!r} is not usable as a directory or URL segment; use letters, digits, '_', '.' "
            "and '-' (not first), e.g. --name my_model"
        )
    return name
