"""``stageformer serve``: settings from flags over ``STAGEFORMER_*`` variables, then uvicorn."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pydantic import ValidationError

from .settings import Settings

# flag name -> Settings field, for the flags that map one to one
FLAGS = {
    "host": "host",
    "port": "port",
    "default_model": "default_model",
    "device": "device",
    "max_batch_size": "max_batch_size",
    "max_queue_delay_ms": "max_queue_delay_ms",
    "max_queue_size": "max_queue_size",
    "request_timeout_s": "request_timeout_s",
    "instances": "instances",
    "threads": "threads",
    "decode_workers": "decode_workers",
    "api_key": "api_key",
    "max_body_bytes": "max_body_bytes",
    "max_image_pixels": "max_image_pixels",
    "max_images": "max_images",
    "cors_origins": "cors_origins",
    "trt_cache_dir": "trt_cache_dir",
    "log_level": "log_level",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag; unset flags fall back to STAGEFORMER_* variables, then the defaults."""
    fields = Settings.model_fields
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help="ONNX files or folders of them (default: the built-in digits demo)"
    )
    for flag, name in FLAGS.items():
        field = fields[name]
        option = "--" + flag.replace("_", "-")
        default = field.default if field.default is not None else "none"
        help_text = f"{field.description} (env STAGEFORMER_{name.upper()}; default {default!s})"
        if name == "device":
            parser.add_argument(option, choices=["auto", "cpu", "cuda", "tensorrt"], help=help_text)
        elif name == "cors_origins":
            parser.add_argument(option, nargs="+", metavar="ORIGIN", help=help_text)
        else:
            parser.add_argument(option, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, flag) for flag, name in FLAGS.items() if getattr(args, flag, None) is not None}
    if args.models:
        given["models"] = args.models
    return Settings(**given)


class _DrainedError(Exception):
    """SIGTERM after uvicorn finished its graceful shutdown (or before it started)."""


def _drained(signum: int, frame: object) -> None:
    raise _DrainedError


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"stageformer serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app
    from .runtime import ModelLoadError

    logging.getLogger().setLevel(settings.log_level.upper())
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler that was there before it:
    # this one, so that a drained shutdown ends with exit status 0 rather than "killed by SIGTERM".
    signal.signal(signal.SIGTERM, _drained)
    try:
        server.run()
    except _DrainedError:
        return 0
    except ModelLoadError as exc:
        print(f"stageformer serve: {exc}", file=sys.stderr)
        return 2
    return 0 if server.started else 2
