"""``/v1``: images in, labels out."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from ..deps import Registry, require_api_key, wait_for_disconnect
from ..errors import Kind, ServiceError, bad_input, too_large
from ..http_errors import error_responses
from ..postprocess import Prediction as PredictionValue

router = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_api_key)])


class Prediction(BaseModel):
    label: str
    index: int
    score: float


class ImageResult(BaseModel):
    filename: str | None
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    model: str
    results: list[ImageResult]


class ModelList(BaseModel):
    default: str
    models: list[str]  # in load order; each one's metadata is at /v2/models/{name}


@router.get("/models", response_model=ModelList, summary="The served models and the default one")
def list_models(registry: Registry) -> ModelList:
    return ModelList(default=registry.default, models=list(registry.models))


async def read_images(request: Request, max_images: int) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) of every image in the request: multipart ``file`` parts, or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images + 16)
        except (MultiPartException, HTTPException) as exc:  # starlette reports multipart limits both ways
            detail = str(getattr(exc, "detail", None) or exc)
            error = too_large if "Too many" in detail else bad_input
            raise error(f"cannot read the multipart body: {detail} (at most {max_images} images)") from None
        parts = form.getlist("file")
        if not parts:
            names = ", ".join(sorted(set(form.keys()))) or "none"
            raise bad_input(f"no part named 'file' in the form (found: {names}); send each image as a 'file' part")
        images = []
        for part in parts:
            if not isinstance(part, UploadFile):
                raise bad_input("the 'file' part must be a file upload, not a text field")
            images.append((part.filename, await part.read()))
        return images
    if content_type.startswith("image/"):
        return [(None, await request.body())]
    raise ServiceError(
        Kind.UNSUPPORTED_MEDIA,
        f"unsupported Content-Type {content_type or 'none'!r}; send multipart/form-data with 'file' parts "
        "or a raw image body with an image/* Content-Type",
    )


async def _classify(request: Request, registry: Registry, name: str | None, top_k: int) -> ClassifyResponse:
    model = registry.lookup(name)
    with model.arrival() as announcement:
        images = await read_images(request, model.limits.max_images)
        predictions = await model.classify(announcement, images, top_k, partial(wait_for_disconnect, request))
    return ClassifyResponse(
        model=model.name,
        results=[
            ImageResult(filename=filename, predictions=[_prediction(p) for p in row])
            for (filename, _), row in zip(images, predictions, strict=True)
        ],
    )


def _prediction(p: PredictionValue) -> Prediction:
    return Prediction(label=p.label, index=p.index, score=p.score)


TopK = Annotated[int, Query(ge=1, le=10_000, description="how many classes to return per image, best first")]

_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


_ERRORS = error_responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=_BODY,
    responses=_ERRORS,
    summary="Classify with the default model",
)
async def classify(request: Request, registry: Registry, top_k: TopK = 5) -> ClassifyResponse:
    """Send one or more images as multipart ``file`` parts, or one image as the raw body."""
    return await _classify(request, registry, None, top_k)


@router.post(
    "/models/{model}/classify",
    response_model=ClassifyResponse,
    openapi_extra=_BODY,
    responses=_ERRORS,
    summary="Classify with a model",
)
async def classify_with(model: str, request: Request, registry: Registry, top_k: TopK = 5) -> ClassifyResponse:
    return await _classify(request, registry, model, top_k)
