"""The ``stageformer`` command: one argparse parser with a subcommand per job. Each subcommand's options come
from the package that owns the job, through a torch-free module (``export.cli``, ``stageformer.train_args``,
``service.cli``, which makes one flag per server setting); the work itself is imported only when its
subcommand runs, so ``serve`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from stageformer.core import __version__

Handler = Callable[[argparse.Namespace], int]


def _lazy(module: str, function: str) -> Handler:
    """A handler that imports ``module`` only when its subcommand runs (keeps torch out of ``serve``)."""

    def handler(args: argparse.Namespace) -> int:
        run: Handler = getattr(importlib.import_module(module), function)
        return run(args)

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stageformer",
        description="Hierarchical vision transformers from stage configs: build, train, export to ONNX, serve.",
    )
    parser.add_argument("--version", action="version", version=f"stageformer {__version__}")
    parser.add_argument(
        "--log-level",
        dest="global_log_level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO); `serve --log-level` wins where both are given",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("presets", help="list the named model presets", description="List the named model presets.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--config", metavar="NAME", help="print the full JSON config of one preset instead")
    p.set_defaults(handler=_lazy("model.cli", "presets"))

    p = commands.add_parser(
        "import-timm",
        help="turn timm's pretrained MetaFormer weights into a checkpoint",
        description=(
            "Convert timm's model.safetensors of a PoolFormer (v1), PoolFormerV2, ConvFormer or CAFormer model "
            "into a stageformer checkpoint, with that model's pretrained preprocessing. Depths, widths and classes "
            "are read from the weights; the family comes from the model name. Pickled .pth/.bin files are refused."
        ),
    )
    p.add_argument(
        "model_name",
        metavar="TIMM_MODEL_NAME",
        help="timm model name, e.g. poolformer_s12, poolformerv2_s12, convformer_s18, caformer_s18.sail_in1k",
    )
    p.add_argument("weights", metavar="WEIGHTS.safetensors", help="timm's weights (model.safetensors from the hub)")
    p.add_argument("-o", "--output", metavar="CKPT.safetensors", required=True, help="checkpoint file to write")
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="class names, one per line (blank lines ignored) or a JSON list; default: numbered 0, 1, ...",
    )
    p.set_defaults(handler=_lazy("model.cli", "import_timm"))

    from export.cli import add_arguments as add_export_arguments  # torch-free
    from stageformer.train_args import DESCRIPTION as TRAIN_DESCRIPTION
    from stageformer.train_args import add_arguments as add_train_arguments  # torch-free

    p = commands.add_parser(
        "train",
        help="train a model on an image folder or the digits data set",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(handler=_lazy("model.train", "run"))
    from service.cli import add_arguments as add_serve_arguments  # torch-free

    p = commands.add_parser(
        "export",
        help="export a checkpoint to ONNX, checked against PyTorch",
        description="Export a checkpoint to a single-file ONNX model with its config, preprocessing and labels "
        "inside. A parity gate compares ONNX Runtime with PyTorch and refuses to write a model that disagrees.",
    )
    add_export_arguments(p)
    p.set_defaults(handler=_lazy("export.cli", "run"))

    p = commands.add_parser(
        "serve",
        help="serve ONNX models over HTTP (the built-in digits demo when none is given)",
        description="Serve exported ONNX models over HTTP with dynamic batching on ONNX Runtime: /v1 classify, "
        "/v2 Open Inference Protocol, /metrics, /docs. Flags override STAGEFORMER_* environment variables.",
    )
    add_serve_arguments(p)
    p.set_defaults(handler=_lazy("service.cli", "run"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (getattr(args, "log_level", None) or args.global_log_level or "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, KeyError, FileNotFoundError) as exc:  # user errors: one clear line, no traceback
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"stageformer {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
