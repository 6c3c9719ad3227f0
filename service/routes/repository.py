"""``/v2/repository``: the model repository extension of the Open Inference Protocol (Triton's HTTP definitions,
which KServe's model agent calls). The work is ``service.repository``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from ..deps import Registry, State, require_api_key
from ..errors import Kind, ServiceError
from ..http_errors import error_responses
from ..repository import Repository

router = APIRouter(prefix="/v2/repository", tags=["model repository"], dependencies=[Depends(require_api_key)])


def _repository(state: State, registry: Registry) -> Repository:  # Registry: 503 while starting or draining
    if state.repository is None:
        raise ServiceError(Kind.UNAVAILABLE, "the model repository is not running; try again shortly")
    return state.repository


RepositoryDep = Annotated[Repository, Depends(_repository)]
Options = Annotated[dict[str, Any] | None, Body(description="{'ready': true} lists only the models being served")]


@router.post("/index", summary="Models served or found in the model folders", responses=error_responses(400, 401, 503))
async def index(repository: RepositoryDep, options: Options = None) -> list[dict[str, str]]:
    ready_only = bool((options or {}).get("ready", False))
    return [
        {"name": e.name, "version": "1", "state": e.state, "reason": e.reason}
        for e in repository.index()
        if not ready_only or e.state == "READY"
    ]


@router.post(
    "/models/{model}/load",
    summary="Load or reload a model from the model folders",
    responses=error_responses(400, 401, 404, 503),
)
async def load(model: str, repository: RepositoryDep, options: Options = None) -> dict[str, str]:
    await repository.load(model)
    return {}


@router.post(
    "/models/{model}/unload",
    summary="Stop serving a model, once its requests have finished",
    responses=error_responses(400, 401, 404, 503),
)
async def unload(model: str, repository: RepositoryDep, options: Options = None) -> dict[str, str]:
    await repository.unload(model)
    return {}
