"""``stageformer serve``: settings from flags over ``STAGEFORMER_*`` variables, then uvicorn.

Shutdown: the first SIGTERM (or SIGINT) starts a drain. The server keeps its listening socket open and
answers every new request with 503 and ``Retry-After`` (``Connection: close``) while the requests it had
admitted finish, for at most ``drain_timeout_s``; then uvicorn closes the socket and the connections,
the batchers stop, and the process exits with status 0. A second signal stops without waiting for
the drain (uvicorn's own shutdown, a few seconds at most).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .settings import Settings

if TYPE_CHECKING:
    import uvicorn

    from .deps import AppState

logger = logging.getLogger(__name__)

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
    "drain_timeout_s": "drain_timeout_s",
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
    if "log_level" not in given and getattr(args, "global_log_level", None) is not None:
        given["log_level"] = args.global_log_level  # `stageformer --log-level X serve`
    if args.models:
        given["models"] = args.models
    return Settings(**given)


class _DrainedError(Exception):
    """A signal that uvicorn handled itself (during start-up, or a second one during the drain),
    re-raised once its shutdown is done."""


def _drained(signum: int, frame: object) -> None:
    raise _DrainedError


def draining_server(config: uvicorn.Config, state: AppState) -> uvicorn.Server:
    """A uvicorn server that drains on the first SIGTERM/SIGINT (see the module docstring)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # In a signal handler: set flags only. From here on every new request gets 503.
            if self.started and not self.should_exit and state.draining_since is None:
                state.begin_drain()
            else:
                super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if state.draining_since is not None and not self.should_exit:
                waited = time.monotonic() - state.draining_since
                if counter % 10 == 0 or waited < 0.1:
                    logger.info("draining: %d request(s) in flight after %.1f s", state.in_flight, waited)
                if state.in_flight == 0:
                    logger.info("drained in %.2f s; stopping", waited)
                    self.should_exit = True
                elif state.drain_time_left() <= 0 and not state.aborted:
                    cut = state.abort_waiting()  # they answer 503 now; the next tick stops the server
                    logger.warning(
                        "drain timeout of %g s passed with %d request(s) in flight; %d waiting for inference get 503",
                        state.settings.drain_timeout_s, state.in_flight, cut,
                    )  # fmt: skip
                elif state.aborted:
                    self.config.timeout_graceful_shutdown = 2
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


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
        timeout_graceful_shutdown=5,  # after the drain: only answers being written remain
    )
    server = draining_server(config, app.state.stageformer)
    # A signal uvicorn handles itself is re-raised after its shutdown, under the handler that was there
    # before: this one, so that such a shutdown too ends with exit status 0 rather than "killed by SIGTERM".
    signal.signal(signal.SIGTERM, _drained)
    try:
        server.run()
    except _DrainedError:
        return 0
    except ModelLoadError as exc:
        print(f"stageformer serve: {exc}", file=sys.stderr)
        return 2
    return 0 if server.started else 2
