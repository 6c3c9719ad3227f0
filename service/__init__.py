"""Serving: ONNX Runtime sessions, dynamic batching, the HTTP API. Nothing in this package imports torch,
``model`` or ``export``; a serving install has none of them."""

from .app import create_app

__all__ = ["create_app"]
