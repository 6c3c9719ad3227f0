"""Defaults of the export, in one torch-free place (the CLI builds its parser from them without importing
torch). The names the exported file shares with the server (input and output names, metadata keys, the
model-name rule) are on the ground floor, ``stageformer.core``."""

from __future__ import annotations

# Opset 20 is what torch 2.13's exporter emits by default: GELU and LayerNormalization are single
# ONNX ops there, every ONNX Runtime from 1.17 on runs it (CPU and CUDA), and so does TensorRT 10.
# Opset 23 adds the fused ``Attention`` op, but needs ONNX Runtime >= 1.23 (Triton images ship
# older ones) and was no faster on CPU in our measurements.
DEFAULT_OPSET = 20
MIN_OPSET = 18  # torch.onnx's dynamo exporter writes opset 18 and above
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"

BATCH_DIM = "batch"

DEFAULT_ATOL = 1e-4  # max |logit difference| between ONNX Runtime and PyTorch, fp32 graph
DEFAULT_FP16_ATOL = 5e-2  # the same for an fp16 graph against the fp32 PyTorch model
PARITY_BATCH_SIZES = (1, 3, 8)
PARITY_SEED = 0

# int8 quantization (``--quantize int8 --calibration DIR``)
QUANTIZE_CHOICES = ("int8",)
DEFAULT_MIN_AGREEMENT = 0.99  # top-1 agreement of the int8 graph with PyTorch fp32, on each image set
MAX_CALIBRATION_IMAGES = 500  # a larger folder is thinned evenly; MinMax ranges settle long before
RECOMMENDED_CALIBRATION_IMAGES = 100  # fewer is allowed, with a warning
HOLD_OUT_EVERY = 5  # every fifth calibration image checks the result instead of calibrating
CALIBRATION_BATCH_SIZE = 8

DEFAULT_TRITON_MAX_BATCH_SIZE = 32
DEFAULT_TRITON_QUEUE_DELAY_US = 1000

# Files of 2 GiB and more cannot be one protobuf: their weights go to a side file ``<model>.onnx.data``.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000
