"""Application errors, mapped once to HTTP: OpenAI's error body under ``/v1/``, RFC 9457 elsewhere.

Services raise these; controllers never build error responses by hand. Anything unexpected is a
500 in the right format with the request id, and is logged with its traceback.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from sqlalchemy import exc as sa_exc

from market.ids import ulid
from market.logs import request_id_var

log = logging.getLogger(__name__)


class AppError(Exception):
    """An error a client can act on. ``code`` is stable and machine-readable."""

    status = 400
    code = "invalid_request"
    openai_type = "invalid_request_error"
    title = "Bad Request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param
        self.headers = headers or {}


class InvalidRequest(AppError):
    pass


class Unauthorized(AppError):
    status = 401
    code = "invalid_api_key"
    openai_type = "authentication_error"
    title = "Unauthorized"


class Forbidden(AppError):
    status = 403
    code = "forbidden"
    openai_type = "permission_error"
    title = "Forbidden"


class NotFound(AppError):
    status = 404
    code = "not_found"
    openai_type = "invalid_request_error"
    title = "Not Found"


class Conflict(AppError):
    status = 409
    code = "conflict"
    openai_type = "invalid_request_error"
    title = "Conflict"


class PayloadTooLarge(AppError):
    status = 413
    code = "request_too_large"
    title = "Payload Too Large"


class UnsupportedMediaType(AppError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported Media Type"


class RateLimited(AppError):
    status = 429
    code = "rate_limit_exceeded"
    openai_type = "rate_limit_error"
    title = "Too Many Requests"


class QuotaExceeded(RateLimited):
    code = "insufficient_quota"
    openai_type = "insufficient_quota"


class Unavailable(AppError):
    status = 503
    code = "no_capacity"
    openai_type = "server_error"
    title = "Service Unavailable"


class UpstreamError(AppError):
    status = 502
    code = "upstream_error"
    openai_type = "server_error"
    title = "Bad Gateway"


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(
    request: Request[Any, Any, Any],
    status: int,
    message: str,
    *,
    code: str,
    openai_type: str,
    title: str,
    param: str | None = None,
) -> dict[str, Any]:
    path = request.url.path
    request_id = None if is_openai_path(path) else request_id_of(request)  # OpenAI's body has no place for it
    return error_payload(
        path, status, message, code=code, openai_type=openai_type, title=title, param=param, request_id=request_id
    )


def error_media_type(path: str) -> str:
    return "application/json" if is_openai_path(path) else "application/problem+json"


def error_payload(
    path: str,
    status: int,
    message: str,
    *,
    code: str,
    openai_type: str,
    title: str,
    param: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """An error for ``path`` in its API's format: OpenAI's under ``/v1`` (``param``), RFC 9457
    elsewhere (``request_id``; a new one if None)."""
    if is_openai_path(path):
        return {"error": {"message": message, "type": openai_type, "param": param, "code": code}}
    return {
        "type": f"https://docs.compute-market.dev/errors/{code}",
        "title": title,
        "status": status,
        "detail": message,
        "code": code,
        "instance": path,
        "request_id": request_id or "req_" + ulid().lower(),
    }


def request_id_of(request: Request[Any, Any, Any]) -> str:
    """The id the request-id middleware gave; unrouted requests (404/405) never reach it."""
    state = request.scope.setdefault("state", {})
    request_id = state.get("request_id") or request_id_var.get()
    if not request_id:
        request_id = state["request_id"] = "req_" + ulid().lower()
    return str(request_id)


def _response(
    request: Request[Any, Any, Any], status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response[dict[str, Any]]:
    media_type = error_media_type(request.url.path)
    headers = dict(headers or {})
    if not request_id_var.get():
        headers["x-request-id"] = request_id_of(request)
    return Response(content=body, status_code=status, headers=headers, media_type=media_type)


def app_error_handler(request: Request[Any, Any, Any], exc: AppError) -> Response[dict[str, Any]]:
    body = error_body(
        request, exc.status, exc.message, code=exc.code, openai_type=exc.openai_type, title=exc.title, param=exc.param
    )
    return _response(request, exc.status, body, exc.headers)


_HTTP_CODES = {
    400: ("invalid_request", "invalid_request_error", "Bad Request"),
    401: ("invalid_api_key", "authentication_error", "Unauthorized"),
    403: ("forbidden", "permission_error", "Forbidden"),
    404: ("not_found", "invalid_request_error", "Not Found"),
    405: ("method_not_allowed", "invalid_request_error", "Method Not Allowed"),
    413: ("request_too_large", "invalid_request_error", "Payload Too Large"),
    415: ("unsupported_media_type", "invalid_request_error", "Unsupported Media Type"),
    429: ("rate_limit_exceeded", "rate_limit_error", "Too Many Requests"),
}


def http_error_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    code, openai_type, title = _HTTP_CODES.get(status, ("error", "invalid_request_error", "Error"))
    message = exc.detail or title
    if isinstance(exc, ValidationException) and exc.extra:
        message = f"{message}: {exc.extra}"
    if isinstance(exc, NotAuthorizedException):
        code, openai_type = "invalid_api_key", "authentication_error"
    if status >= 500:
        code, openai_type, title = "internal_error", "server_error", "Internal Server Error"
    body = error_body(request, status, str(message), code=code, openai_type=openai_type, title=title)
    return _response(request, status, body, dict(exc.headers or {}))


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body = error_body(
        request,
        HTTP_500_INTERNAL_SERVER_ERROR,
        "internal error; the request id identifies it",
        code="internal_error",
        openai_type="server_error",
        title="Internal Server Error",
    )
    return _response(request, HTTP_500_INTERNAL_SERVER_ERROR, body)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, the driver error SQLAlchemy wraps (``orig``) and their causes, outermost first."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        todo += [getattr(item, "orig", None), item.__cause__]
    return seen


DATABASE_AWAY: tuple[type[BaseException], ...] = (
    OSError,  # TimeoutError among them
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # shutting down, starting up (CannotConnectNowError)
    asyncpg.TooManyConnectionsError,
)
"""What a lost, restarting, full or unreachable PostgreSQL raises through asyncpg: a 503 to retry."""
_SQLALCHEMY_AWAY = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def database_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """What the database refused because of the request's values is the client's to fix (400); a
    concurrent request that took the same unique name first is a 409; a deadlock or serialization
    failure, or a database (or another service) out of reach, is a 503 to retry. Anything else
    stays an internal error."""
    chain = _chain(exc)
    error: AppError | None = None
    if data := next((e for e in chain if isinstance(e, asyncpg.DataError)), None):
        error = InvalidRequest(f"a value in the request cannot be stored: {data}", code="invalid_value")
    elif isinstance(exc, OverflowError) or any(isinstance(e, OverflowError) for e in chain):
        error = InvalidRequest("a number or date in the request is out of range", code="invalid_value")
    elif any(isinstance(e, asyncpg.UniqueViolationError) for e in chain):
        error = Conflict("a record with the same name or key was created at the same time", code="conflict")
    elif any(isinstance(e, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)) for e in chain):
        # Lock orders are kept so that this should not happen; if it does, the change was rolled
        # back whole and trying again is right.
        error = Unavailable("a concurrent change got in the way; retry", code="conflict_retry")
        error.headers["Retry-After"] = "1"
    elif any(isinstance(e, DATABASE_AWAY + _SQLALCHEMY_AWAY) for e in chain):
        error = Unavailable("a service this request needs is unavailable; retry shortly", code="unavailable")
        error.headers["Retry-After"] = "1"
    if error is None:
        return internal_error_handler(request, exc)
    # The client's values (4xx) need no traceback in the log; a database away (503) keeps one.
    log.warning("%s %s: %s", request.method, request.url.path, exc, exc_info=exc if error.status >= 500 else None)
    return app_error_handler(request, error)


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    AppError: app_error_handler,
    HTTPException: http_error_handler,
    sa_exc.SQLAlchemyError: database_error_handler,
    asyncpg.PostgresError: database_error_handler,
    asyncpg.InterfaceError: database_error_handler,
    OSError: database_error_handler,
    OverflowError: database_error_handler,
    Exception: internal_error_handler,
}
