"""The FastAPI app: ``create_app(settings)``. Models are loaded in the lifespan, never at import (or, by
``stageformer serve``, before the server listens, and handed in)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from stageformer.core import __version__

from .http_errors import install_error_handlers
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware, ReadDeadlineMiddleware
from .registry import ModelRegistry
from .repository import Repository
from .routes import ops, page, repository, v1, v2
from .routes.grpc_api import start_grpc
from .settings import Settings
from .state import AppState

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    registry: ModelRegistry | None = None,
    metrics: Metrics | None = None,
    decode_pool: ThreadPoolExecutor | None = None,
) -> FastAPI:
    """The server for ``settings`` (defaults: environment variables, then built-in defaults). Without
    ``registry`` the lifespan loads the models; with one (loaded with ``metrics`` and ``decode_pool``), it
    serves those. Either way the lifespan's end stops them."""
    settings = settings or Settings()
    state = AppState(settings=settings, metrics=metrics or Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.decode_pool = decode_pool or ThreadPoolExecutor(settings.decode_threads(), thread_name_prefix="decode")
        try:
            models = registry
            if models is None:
                models = await run_in_threadpool(ModelRegistry.load, settings, state.metrics, state.decode_pool)
        except BaseException:
            state.decode_pool.shutdown(wait=False)
            raise
        state.registry = models
        state.repository = repository = Repository(state)
        async with contextlib.AsyncExitStack() as running:
            if settings.grpc_port:
                grpc_server = await start_grpc(state)
                running.push_async_callback(grpc_server.stop, 2.0)  # after the drain: answers being sent
            if settings.watch:
                watching = asyncio.ensure_future(repository.watch(settings.watch_interval_s))
                running.callback(watching.cancel)
            state.ready = True
            logger.info("ready: %s (default %r)", ", ".join(models.models), models.default)
            try:
                yield
            finally:
                state.ready = False  # new requests get 503 while queued work finishes
        await repository.close()
        await run_in_threadpool(state.registry.close, state.close_timeout())
        state.decode_pool.shutdown(wait=True)
        state.json_parser.close()
        logger.info("stopped")

    app = FastAPI(
        title="stageformer",
        version=__version__,
        description="Image classification with hierarchical vision transformers on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.stageformer = state
    install_error_handlers(app, state.metrics)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(repository.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    app.add_middleware(ReadDeadlineMiddleware, grace_s=settings.body_timeout_s, min_rate=settings.body_min_rate)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
