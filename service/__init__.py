"""Serving: ONNX Runtime sessions, dynamic batching, the HTTP API. Nothing in this package imports torch,
``model`` or ``export``; a serving install has none of them.

``create_app`` is imported on first use, so that a process that needs only a light module of this package
(the JSON body parser's worker process: ``service.oip``) does not load FastAPI and ONNX Runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
