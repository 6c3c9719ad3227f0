"""Errors as HTTP answers: every error is JSON ``{"error": "..."}`` with the status its kind maps to
(``service.errors.KINDS``), never a traceback. Refusals are counted in the metrics with their reason."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .errors import KINDS, RETRY_AFTER_S, Kind, ServiceError, client_gone
from .metrics import Metrics

logger = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """Every error response: what went wrong and what to do."""

    error: str


_STATUS_KIND = {m.http_status: kind for kind, m in KINDS.items() if kind is not Kind.UNAVAILABLE}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` documenting the error statuses a route can answer."""
    return {s: {"model": ErrorBody, "description": KINDS[_STATUS_KIND[s]].meaning} for s in statuses}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def http_headers(error: ServiceError) -> dict[str, str]:
    headers = {}
    if error.retry:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if error.close:
        headers["Connection"] = "close"
    if error.kind is Kind.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def service_error_response(error: ServiceError, metrics: Metrics) -> JSONResponse:
    """The answer to a ``ServiceError``, counted as a refusal with its model and reason."""
    metrics.rejections.labels(error.model or "", error.reason).inc()
    return error_response(KINDS[error.kind].http_status, error.message, http_headers(error))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "malformed request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc, metrics)

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return service_error_response(client_gone(), metrics)  # nobody reads it; it is counted and not logged

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}; see /docs"
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error; the server logged the details")
