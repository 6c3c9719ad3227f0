"""The FastAPI app: ``create_app(settings)``. Models are loaded in the lifespan, never at import."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from stageformer.core import __version__

from .deps import AppState
from .errors import install_error_handlers
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .registry import ModelRegistry
from .routes import ops, page, v1, v2
from .settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The server for ``settings`` (defaults: environment variables, then built-in defaults)."""
    settings = settings or Settings()
    state = AppState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.decode_pool = ThreadPoolExecutor(
            settings.decode_workers or min(8, os.cpu_count() or 1), thread_name_prefix="decode"
        )
        state.registry = await run_in_threadpool(ModelRegistry.load, settings, state.metrics)
        state.ready = True
        logger.info("ready: %s (default %r)", ", ".join(state.registry.models), state.registry.default)
        try:
            yield
        finally:
            state.ready = False  # new requests get 503 while queued work finishes
            await run_in_threadpool(state.registry.close, state.close_timeout())
            state.decode_pool.shutdown(wait=True)
            logger.info("stopped")

    app = FastAPI(
        title="stageformer",
        version=__version__,
        description="Image classification with hierarchical vision transformers on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.stageformer = state
    install_error_handlers(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
