"""``/v1``: images in, labels out."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from stageformer.core.preprocess import normalize, stack

from ..deps import Registry, State, admitted, in_decode_pool, lookup_model, require_api_key, run_inference
from ..errors import APIError, error_responses
from ..images import ImageError, prepare

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


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def top_predictions(logits: np.ndarray, labels: tuple[str, ...], k: int) -> list[Prediction]:
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs, kind="stable")[:k]
    return [Prediction(label=labels[i], index=int(i), score=float(probs[i])) for i in order]


async def read_images(request: Request, max_images: int) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) of every image in the request: multipart ``file`` parts, or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images + 16)
        except (MultiPartException, HTTPException) as exc:  # starlette reports multipart limits both ways
            detail = str(getattr(exc, "detail", None) or exc)
            status = 413 if "Too many" in detail else 400
            raise APIError(status, f"cannot read the multipart body: {detail} (at most {max_images} images)") from None
        parts = form.getlist("file")
        if not parts:
            names = ", ".join(sorted(set(form.keys()))) or "none"
            raise APIError(400, f"no part named 'file' in the form (found: {names}); send each image as a 'file' part")
        images = []
        for part in parts:
            if not isinstance(part, UploadFile):
                raise APIError(400, "the 'file' part must be a file upload, not a text field")
            images.append((part.filename, await part.read()))
        return images
    if content_type.startswith("image/"):
        return [(None, await request.body())]
    raise APIError(
        415,
        f"unsupported Content-Type {content_type or 'none'!r}; send multipart/form-data with 'file' parts "
        "or a raw image body with an image/* Content-Type",
    )


async def _classify(
    request: Request, state: State, registry: Registry, name: str | None, top_k: int
) -> ClassifyResponse:
    model = lookup_model(registry, name)
    with admitted(state, model):  # before the body is read: a full server refuses at once
        info = model.info
        settings = state.settings
        images = await read_images(request, settings.max_images)
        started = time.perf_counter()
        jobs = [
            in_decode_pool(state, prepare, data, info.preprocess, settings.max_image_pixels, f"image {filename or i}")
            for i, (filename, data) in enumerate(images)
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, ImageError):
                raise APIError(result.status, result.message)
            if isinstance(result, BaseException):
                raise result
        pixels: list[np.ndarray] = list(results)  # type: ignore[arg-type]
        if info.input_format == "normalized":
            pixels = list(normalize(stack(pixels), info.preprocess))
        state.metrics.preprocess_seconds.labels(info.name).observe((time.perf_counter() - started) / len(images))
        logits = await run_inference(state, model, pixels, request)
    k = min(top_k, info.num_classes)
    return ClassifyResponse(
        model=info.name,
        results=[
            ImageResult(filename=filename, predictions=top_predictions(row, info.labels, k))
            for (filename, _), row in zip(images, logits, strict=True)
        ],
    )


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


_ERRORS = error_responses(400, 401, 404, 413, 415, 422, 500, 503, 504)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=_BODY,
    responses=_ERRORS,
    summary="Classify with the default model",
)
async def classify(request: Request, state: State, registry: Registry, top_k: TopK = 5) -> ClassifyResponse:
    """Send one or more images as multipart ``file`` parts, or one image as the raw body."""
    return await _classify(request, state, registry, None, top_k)


@router.post(
    "/models/{model}/classify",
    response_model=ClassifyResponse,
    openapi_extra=_BODY,
    responses=_ERRORS,
    summary="Classify with a model",
)
async def classify_with(
    model: str, request: Request, state: State, registry: Registry, top_k: TopK = 5
) -> ClassifyResponse:
    return await _classify(request, state, registry, model, top_k)
