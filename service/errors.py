"""What can go wrong with a request, as kinds with a meaning, and the one table that maps each kind to an
HTTP status and a gRPC status code.

Code anywhere in the server raises ``ServiceError(kind, message)``; it knows nothing of HTTP or gRPC. The
HTTP layer (``service.http_errors``) and the gRPC layer turn a kind into their own status with ``KINDS``.
Every message says what went wrong and what to do.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Kind(enum.Enum):
    BAD_INPUT = "bad_input"  # an image or tensor that cannot be used
    UNAUTHENTICATED = "unauthenticated"  # missing or wrong API key
    NOT_FOUND = "not_found"  # unknown model (or version)
    SLOW_CLIENT = "slow_client"  # the request's headers or body did not arrive in time
    TOO_LARGE = "too_large"  # body, image, image count or batch beyond a limit
    UNSUPPORTED_MEDIA = "unsupported_media"  # not an image, or an unsupported Content-Type
    MALFORMED = "malformed"  # query parameters or request fields of the wrong type
    OVERLOADED = "overloaded"  # too many requests in progress or waiting: retry later
    UNAVAILABLE = "unavailable"  # starting, shutting down, or the model is being unloaded: retry later
    TIMEOUT = "timeout"  # no result within the request timeout; the request was not run
    CLIENT_GONE = "client_gone"  # the client closed its connection; nobody reads the answer
    INTERNAL = "internal"  # inference failed on the server (never for bad input)


@dataclass(frozen=True)
class Mapping:
    http_status: int
    grpc_code: str  # the name of a grpc.StatusCode member
    meaning: str  # for the OpenAPI description of the status


KINDS: dict[Kind, Mapping] = {
    Kind.BAD_INPUT: Mapping(400, "INVALID_ARGUMENT", "bad input: an image or tensor that cannot be used"),
    Kind.UNAUTHENTICATED: Mapping(401, "UNAUTHENTICATED", "missing or wrong API key"),
    Kind.NOT_FOUND: Mapping(404, "NOT_FOUND", "unknown model"),
    Kind.SLOW_CLIENT: Mapping(408, "DEADLINE_EXCEEDED", "the request's headers or body did not arrive in time"),
    Kind.TOO_LARGE: Mapping(413, "INVALID_ARGUMENT", "body, image (pixels), image count or batch too large"),
    Kind.UNSUPPORTED_MEDIA: Mapping(415, "INVALID_ARGUMENT", "not an image, or an unsupported Content-Type"),
    Kind.MALFORMED: Mapping(422, "INVALID_ARGUMENT", "malformed request (query parameters)"),
    Kind.OVERLOADED: Mapping(503, "UNAVAILABLE", "overloaded: retry after `Retry-After` seconds"),
    Kind.UNAVAILABLE: Mapping(503, "UNAVAILABLE", "starting or shutting down: retry after `Retry-After` seconds"),
    Kind.TIMEOUT: Mapping(504, "DEADLINE_EXCEEDED", "no result within the request timeout; the request was not run"),
    Kind.CLIENT_GONE: Mapping(499, "CANCELLED", "the client closed the connection (nobody receives this answer)"),
    Kind.INTERNAL: Mapping(500, "INTERNAL", "inference failed on the server (never for bad input)"),
}

RETRY_AFTER_S = 1  # what a refused client is told to wait (overloaded, starting, shutting down)


class ServiceError(Exception):
    """A request cannot be answered with a result; ``kind`` says why, ``message`` what to do.

    ``retry`` marks refusals that a client should simply send again later (``Retry-After``); ``close``
    asks the HTTP layer to close the connection after the answer (a client that stalled, or a server
    that is going away). ``model`` (a served model's name) and ``reason`` (finer than the kind, from a
    fixed set of words) label the refusal in the metrics.
    """

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        retry: bool = False,
        close: bool = False,
        model: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry = retry or kind in (Kind.OVERLOADED, Kind.UNAVAILABLE)
        self.close = close
        self.model = model
        self.reason = reason or kind.value

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole, for an error raised in a worker process (``service.bodies``)."""
        return (_rebuild, (self.kind, self.message, self.retry, self.close, self.model, self.reason))


def _rebuild(kind: Kind, message: str, retry: bool, close: bool, model: str | None, reason: str | None) -> ServiceError:
    return ServiceError(kind, message, retry=retry, close=close, model=model, reason=reason)


def bad_input(message: str) -> ServiceError:
    return ServiceError(Kind.BAD_INPUT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(Kind.NOT_FOUND, message)


def too_large(message: str) -> ServiceError:
    return ServiceError(Kind.TOO_LARGE, message)


def shutting_down(message: str, model: str | None = None) -> ServiceError:
    return ServiceError(Kind.UNAVAILABLE, message, close=True, model=model, reason="draining")


def client_gone(model: str | None = None) -> ServiceError:
    message = "the client closed the connection before the answer was ready"
    return ServiceError(Kind.CLIENT_GONE, message, model=model, reason="client_gone")
