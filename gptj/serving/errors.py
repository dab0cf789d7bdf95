"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import traceback

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gptj.errors import GPTJError

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(GPTJError):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


async def api_error_handler(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def validation_error_handler(request: Request, err: RequestValidationError) -> JSONResponse:
    """pydantic's 422 becomes a 400 naming the first bad field."""
    first = err.errors()[0] if err.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    elif param:
        message = f"{param}: {message}"
    return JSONResponse(error_body(400, message, param), status_code=400)


class CatchUnexpectedErrors:
    """ASGI middleware: an unexpected error in a route is a JSON 500 in the OpenAI shape.

    Starlette's own handler for `Exception` answers and then re-raises, and uvicorn closes the
    connection of an application that raised, so the next request on that keep-alive connection
    would fail. Here the error ends with the answer (a stream already started just ends).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as err:  # noqa: BLE001 - every error must leave the server serving
            traceback.print_exception(err)
            if not started:
                response = JSONResponse(error_body(500, f"internal error: {type(err).__name__}: {err}"),
                                        status_code=500)
                await response(scope, receive, send)
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
