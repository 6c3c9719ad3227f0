"""FastAPI dependencies: app state reached through ``Annotated[..., Depends(...)]``."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, Request

from .batcher import BatchFailedError, NotAcceptingError, QueueFullError, RequestTimeoutError
from .errors import APIError
from .metrics import Metrics
from .registry import ModelRegistry, ServedModel
from .settings import Settings

T = TypeVar("T")


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None  # None until the lifespan has loaded every model
    decode_pool: ThreadPoolExecutor | None = None
    ready: bool = False


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.stageformer
    return state


State = Annotated[AppState, Depends(get_state)]


def get_registry(state: State) -> ModelRegistry:
    if state.registry is None or not state.ready:
        raise APIError(503, "the server is starting or stopping; try again shortly", {"Retry-After": "1"})
    return state.registry


Registry = Annotated[ModelRegistry, Depends(get_registry)]


def require_api_key(request: Request, state: State) -> None:
    """With an API key set, inference and metadata routes need ``Authorization: Bearer KEY``."""
    key = state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise APIError(
            401, "missing or wrong API key; send `Authorization: Bearer <key>`", {"WWW-Authenticate": "Bearer"}
        )


def lookup_model(registry: ModelRegistry, name: str | None) -> ServedModel:
    model = registry.get(name)
    if model is None:
        raise APIError(404, f"unknown model {name!r}; served models: {', '.join(sorted(registry.models))}")
    return model


async def run_inference(state: AppState, model: ServedModel, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Batcher results, with its errors turned into HTTP errors."""
    try:
        return await model.infer(inputs, state.settings.request_timeout_s)
    except QueueFullError as exc:
        state.metrics.rejections.labels(model.name, "queue_full").inc()
        raise APIError(503, f"overloaded: {exc}; retry later", {"Retry-After": "1"}) from None
    except NotAcceptingError as exc:
        state.metrics.rejections.labels(model.name, "shutting_down").inc()
        raise APIError(503, str(exc), {"Retry-After": "1"}) from None
    except RequestTimeoutError as exc:
        state.metrics.rejections.labels(model.name, "timeout").inc()
        raise APIError(504, str(exc)) from None
    except BatchFailedError as exc:
        raise APIError(500, f"{exc}; the server logged the details") from None


async def in_decode_pool(state: AppState, fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work (image decoding, preprocessing) in the decode worker pool."""
    return await asyncio.get_running_loop().run_in_executor(state.decode_pool, fn, *args)
