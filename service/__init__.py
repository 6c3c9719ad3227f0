"""Serving: preprocessing, ONNX Runtime sessions, dynamic batching and the HTTP API.

Nothing in this package imports torch; a serving install has none. ``create_app`` is imported on
first use, so that ``service.preprocess`` (used by training and export) needs no web framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'service' has no attribute {name!r}")
