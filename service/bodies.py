"""Large all-JSON inference bodies are parsed in a worker process.

A JSON tensor of millions of numbers becomes millions of Python objects while it is parsed: tens of
milliseconds with the interpreter's lock held, and a garbage collection pass over them afterwards. In a
thread of the server that stalls the event loop (and every other request, health checks included) for as
long. In a worker process only the parsed header and the tensor's bytes come back. Binary tensors, and JSON
bodies small enough to parse in a few milliseconds, never come here.

One process, started on the first large body (``spawn``: the server's threads make ``fork`` unsafe); one
that dies (killed for memory, say) fails only the requests it held and is replaced on the next one.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from .errors import Kind, ServiceError, shutting_down
from .oip import InferenceRequest, TensorSpec, decode_json_request

logger = logging.getLogger(__name__)

PROCESS_PARSE_BYTES = 1024 * 1024  # all-JSON bodies above this size are parsed in the worker process


class JsonBodyParser:
    """Parses large all-JSON inference bodies in a worker process (see the module docstring)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise shutting_down("the server is shutting down; send the request again (to another instance)")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    async def decode(self, body: bytes, spec: TensorSpec) -> tuple[InferenceRequest, np.ndarray]:
        """The parsed request (without its ``data``) and its input tensor; ``ServiceError`` as ``oip``'s."""
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, decode_json_request, body, spec)
        except BrokenProcessPool:
            logger.error("the JSON parsing process died; a new one starts with the next large JSON body")
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise ServiceError(
                Kind.INTERNAL, "the process parsing this JSON body died; send it again, or send binary tensors",
                reason="parser_died",
            ) from None  # fmt: skip

    def close(self) -> None:
        """Stop the worker process (requests it holds fail); later bodies are refused."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
