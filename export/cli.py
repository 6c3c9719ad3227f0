"""``stageformer export``: its options and its handler. Importing this module does not import torch;
``run`` does, when the export starts."""

from __future__ import annotations

import argparse
import sys

from stageformer.core.formats import INPUT_FORMATS

from .options import (
    DEFAULT_ATOL,
    DEFAULT_EXPORTER,
    DEFAULT_FP16_ATOL,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_OPSET,
    DEFAULT_TRITON_MAX_BATCH_SIZE,
    DEFAULT_TRITON_QUEUE_DELAY_US,
    EXPORTERS,
    MIN_OPSET,
    QUANTIZE_CHOICES,
)

DESCRIPTION = (
    "Export a checkpoint to a single ONNX file: uint8 [batch, H, W, 3] images in (or normalized float32 "
    "[batch, 3, H, W] with --input normalized), float32 [batch, num_classes] logits out, batch axis dynamic. "
    "The file carries the model's config, preprocessing, labels and provenance in its metadata. Before it is "
    "written, ONNX Runtime (CPU) is checked against PyTorch on random and real-looking images at batch sizes "
    "1, 3 and 8; if the logits differ by more than --atol, nothing is written and the exit status is 1. "
    "--quantize int8 --calibration DIR then quantizes the checked graph for CPUs and writes it only if its top-1 "
    "predictions agree with PyTorch's on the calibration images and on held-out ones (--min-agreement)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``stageformer export``'s arguments on ``parser``."""
    parser.add_argument("checkpoint", metavar="CKPT.safetensors", help="checkpoint to export")
    parser.add_argument("-o", "--output", metavar="MODEL.onnx", required=True, help="ONNX file to write")
    _add_graph_arguments(parser)
    _add_precision_arguments(parser)
    _add_triton_arguments(parser)


def _add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    """The graph's input, opset and exporter, the parity tolerance and the model's name."""
    parser.add_argument(
        "--input",
        choices=INPUT_FORMATS,
        default="raw",
        help="raw (default): uint8 [batch, H, W, 3] RGB pixels, normalization inside the graph; "
        "normalized: float32 [batch, 3, H, W], already normalized",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        metavar="N",
        help=f"ONNX opset, {MIN_OPSET} or above (default {DEFAULT_OPSET}: runs on ONNX Runtime >= 1.17 and TensorRT)",
    )
    parser.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default=DEFAULT_EXPORTER,
        help="torch.onnx exporter: dynamo (default, torch.export based) or torchscript (deprecated by PyTorch, "
        "about 5x faster to export)",
    )

    parser.add_argument(
        "--atol",
        type=float,
        metavar="X",
        help=f"largest allowed |logit difference| to PyTorch fp32 (default {DEFAULT_ATOL:g}; {DEFAULT_FP16_ATOL:g} "
        "with --fp16)",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="model name stored in the file and used as the Triton model directory (default: the checkpoint's "
        "file name without extension)",
    )


def _add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """fp16 for GPUs, int8 quantization for CPUs and its calibration and gate."""
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="weights and compute in float16, for GPUs; input and output types stay as they are",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help="int8: quantize weights and activations for CPUs (ONNX Runtime static quantization, QDQ); needs "
        "--calibration; the input and output stay as they are",
    )
    parser.add_argument(
        "--calibration",
        metavar="DIR",
        help="folder of representative images (any format and size, sub-folders included; a few hundred work "
        "best) to calibrate --quantize int8; every fifth is held out to check the result",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=DEFAULT_MIN_AGREEMENT,
        metavar="F",
        help="with --quantize: the smallest fraction of images whose top-1 class must match PyTorch fp32's, on the "
        f"calibration images and on the held-out ones (default {DEFAULT_MIN_AGREEMENT:g})",
    )


def _add_triton_arguments(parser: argparse.ArgumentParser) -> None:
    """The optional Triton Inference Server repository entry."""
    parser.add_argument(
        "--triton-repo",
        metavar="DIR",
        help="also write a Triton Inference Server model repository entry: DIR/NAME/config.pbtxt, "
        "DIR/NAME/labels.txt, DIR/NAME/1/model.onnx",
    )
    parser.add_argument(
        "--triton-max-batch-size",
        type=int,
        default=DEFAULT_TRITON_MAX_BATCH_SIZE,
        metavar="N",
        help=f"max_batch_size in the Triton config (default {DEFAULT_TRITON_MAX_BATCH_SIZE})",
    )
    parser.add_argument(
        "--triton-max-queue-delay-us",
        type=int,
        default=DEFAULT_TRITON_QUEUE_DELAY_US,
        metavar="US",
        help="how long Triton's dynamic batcher waits to fill a batch, in microseconds "
        f"(default {DEFAULT_TRITON_QUEUE_DELAY_US})",
    )


def run(args: argparse.Namespace) -> int:
    """Export as ``args`` say, printing one line per step; 0 on success, 1 when the export failed
    (nothing written then)."""
    from model import CheckpointError

    from .onnx import ExportError, export_onnx

    def progress(step: str, message: str) -> None:
        print(f"{step:>6}  {message}", flush=True)

    try:
        export_onnx(
            args.checkpoint,
            args.output,
            input=args.input,
            opset=args.opset,
            fp16=args.fp16,
            atol=args.atol,
            name=args.name,
            triton_repo=args.triton_repo,
            triton_max_batch_size=args.triton_max_batch_size,
            triton_max_queue_delay_us=args.triton_max_queue_delay_us,
            exporter=args.exporter,
            quantize=args.quantize,
            calibration=args.calibration,
            min_agreement=args.min_agreement,
            progress=progress,
        )
    except (ExportError, CheckpointError, FileNotFoundError) as exc:
        print(f"stageformer export: error: {exc}", file=sys.stderr)
        return 1
    return 0
