"""API errors and their translation into OpenAI's error JSON at the HTTP edge."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from services.gateway.protocol import ErrorInfo, ErrorResponse
from shared.messages import ChatResult

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client sees, in OpenAI's vocabulary."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.info = ErrorInfo(message=message, type=type_, param=param, code=code)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """The HTTP response for this error (with its headers, e.g. Retry-After)."""
        return JSONResponse(ErrorResponse(error=self.info).model_dump(), status_code=self.status, headers=self.headers)


RESULT_ERROR_STATUS = {"invalid_request_error": 400, "cancelled": 409, "timeout": 504}
RESULT_CODE_STATUS = {"model_not_found": 404, "pool_unavailable": 503}


def error_from_result(result: ChatResult) -> ApiError:
    """The HTTP error for a result that carries one."""
    assert result.error is not None
    status = RESULT_CODE_STATUS.get(result.error.code or "") or RESULT_ERROR_STATUS.get(result.error.type, 500)
    return ApiError(status, result.error.message, result.error.type, None, result.error.code)


def validation_error(error: RequestValidationError) -> ApiError:
    """400 naming the first bad field (e.g. `messages.0.role`), as OpenAI does."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"Invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg"))
    return ApiError(400, message, "invalid_request_error", param, first.get("type"))


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at this request's path."""
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, BaseRoute) and route.matches({**request.scope, "method": "GET"})[0] != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the gateway as OpenAI error JSON: never HTML, never a stack trace."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error).response()

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        headers = dict(error.headers or {})
        if error.status_code == 405:  # Starlette names only the first matching route's methods
            headers["Allow"] = ", ".join(allowed_methods(request))
        return ApiError(error.status_code, str(error.detail), kind, headers=headers).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return ApiError(500, "The server had an error while processing your request", "server_error").response()
