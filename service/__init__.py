"""Serving: preprocessing, ONNX Runtime sessions, dynamic batching and the HTTP API.

Nothing in this package imports torch; a serving install has none.
"""
