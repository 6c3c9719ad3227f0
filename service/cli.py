"""``stageformer serve``: one flag per ``Settings`` field (flags over ``STAGEFORMER_*`` variables over the
defaults), the models loaded before the server listens, then uvicorn (``service.server``).

A model that cannot be loaded stops the command with one line saying why and exit status 2, before any
port is opened.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import types
import typing
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from .settings import Settings

logger = logging.getLogger(__name__)

POSITIONAL = "models"  # the one setting given as arguments rather than a flag


def _choices(annotation: Any) -> list[str] | None:
    """The values of a ``Literal`` annotation (also inside ``X | None``), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        literals = [_choices(a) for a in typing.get_args(annotation) if a is not type(None)]
        if len(literals) == 1:
            return literals[0]
    return None


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _flag_options(name: str, field: FieldInfo) -> dict[str, Any]:
    default = field.get_default(call_default_factory=True)
    shown = "none" if default in (None, []) else default
    options: dict[str, Any] = {
        "dest": name,
        "help": f"{field.description} (env STAGEFORMER_{name.upper()}; default {shown})".replace("%", "%%"),
    }
    choices = _choices(field.annotation)
    if choices is not None:
        options.update(choices=choices, type=str.lower if all(c.islower() for c in choices) else str)
    elif _is_list(field.annotation):
        options.update(nargs="+", metavar="VALUE")
    elif field.annotation is bool:
        options["action"] = argparse.BooleanOptionalAction
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag; unset flags fall back to STAGEFORMER_* variables, then the defaults."""
    fields = Settings.model_fields
    parser.add_argument(POSITIONAL, nargs="*", metavar="MODEL", help=fields[POSITIONAL].description)
    for name, field in fields.items():
        if name != POSITIONAL:
            parser.add_argument("--" + name.replace("_", "-"), **_flag_options(name, field))


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) not in (None, [])}
    if "log_level" not in given and getattr(args, "global_log_level", None) is not None:
        given["log_level"] = args.global_log_level  # `stageformer --log-level X serve`
    return Settings(**given)


class _DrainedError(Exception):
    """A signal that uvicorn handled itself (during start-up, or a second one during the drain),
    re-raised once its shutdown is done."""


def _drained(signum: int, frame: object) -> None:
    raise _DrainedError


def _invalid(exc: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
    return f"invalid settings: {problems}"


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"stageformer serve: {_invalid(exc)}", file=sys.stderr)
        return 2
    from .app import create_app
    from .metrics import Metrics
    from .registry import ModelRegistry
    from .runtime import ModelLoadError
    from .server import draining_server, uvicorn_config

    logging.getLogger().setLevel(settings.log_level.upper())
    metrics = Metrics()
    pool = ThreadPoolExecutor(settings.decode_threads(), thread_name_prefix="decode")
    try:
        registry = ModelRegistry.load(settings, metrics, pool)
    except ModelLoadError as exc:
        pool.shutdown()
        print(f"stageformer serve: cannot serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, registry=registry, metrics=metrics, decode_pool=pool)
    # What start-up made (modules, the models, the app) lives as long as the process: out of the cyclic
    # collector's sight, each full collection under load holds the GIL for ~1.5 ms instead of ~50 ms (the CIFAR
    # model at 16 clients on 2 cores: ten a quarter-minute, p99 63 instead of 84 ms).
    gc.collect()
    gc.freeze()
    server = draining_server(uvicorn_config(app, settings), app.state.stageformer)
    # A signal uvicorn handles itself is re-raised after its shutdown, under the handler that was there
    # before: this one, so that such a shutdown too ends with exit status 0 rather than "killed by SIGTERM".
    signal.signal(signal.SIGTERM, _drained)
    try:
        server.run()
    except _DrainedError:
        return 0
    return 0 if server.started else 2
