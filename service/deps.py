"""FastAPI dependencies: the app state and the served models reached through ``Annotated[..., Depends(...)]``,
and the API key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .errors import Kind, ServiceError
from .registry import ModelRegistry
from .security import bearer_matches
from .state import AppState


async def get_state(request: Request) -> AppState:  # async: no thread-pool hop per request
    state: AppState = request.app.state.stageformer
    return state


State = Annotated[AppState, Depends(get_state)]


async def get_registry(state: State) -> ModelRegistry:
    return state.serving()


Registry = Annotated[ModelRegistry, Depends(get_registry)]


async def require_api_key(request: Request, state: State) -> None:
    """With an API key set, inference and metadata routes need ``Authorization: Bearer KEY``."""
    key = state.settings.api_key
    if key is not None and not bearer_matches(request.headers.get("authorization"), key):
        raise ServiceError(Kind.UNAUTHENTICATED, "missing or wrong API key; send `Authorization: Bearer <key>`")


async def wait_for_disconnect(request: Request) -> None:
    """Completes when the client has gone. Only for after the body was read: ``receive`` then has nothing
    else to say but the disconnect."""
    while (await request.receive()).get("type") != "http.disconnect":
        pass
