"""A limit on request body size, enforced while the body arrives.

FastAPI reads a whole body into memory and parses it before any route runs, so a 100 MB prompt
held gigabytes (bytes, str, the parsed JSON, then the tokenizer's copies) before its length was
ever checked. Here a body announced larger than the limit (Content-Length) is answered 413
without keeping any of it, and a chunked body is refused as soon as the bytes read pass the limit.

Most clients (httpx, so the OpenAI SDK) read no answer before they have sent the whole body, so
the rest of a refused body is read and thrown away (memory stays flat) for the client to see the
413; past DRAIN_BYTES the connection is closed instead.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .errors import error_body

MAX_BODY_BYTES = 4 * 1024 * 1024  # a full-context prompt of a 2048-token model is ~10 KB of text
DRAIN_BYTES = 128 * 1024 * 1024  # the most of a refused body read (and dropped) so the client sees the 413


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a chunked body passes the limit; answered as a 413."""

    def __init__(self, limit: int):
        super().__init__(413)
        self.limit = limit


def too_large_response(limit: int, length: int | None = None) -> JSONResponse:
    size = f"{length} bytes" if length is not None else "more than that"
    message = f"the request body is {size}; this server takes at most {limit} bytes"
    return JSONResponse(error_body(413, message, code="request_too_large"), status_code=413,
                        headers={"Connection": "close"})


async def body_too_large_handler(request, err: BodyTooLarge) -> JSONResponse:
    return too_large_response(err.limit)


async def drain(receive, received: int) -> bool:
    """Read and drop the rest of a body, up to DRAIN_BYTES in all; False if it went on past that."""
    while received <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return False
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


class BodyLimit:
    """ASGI middleware: bodies above `limit()` bytes are a 413 (counted in `on_refused`)."""

    def __init__(self, app, limit: Callable[[], int], on_refused: Callable[[], None] = lambda: None):
        self.app, self.limit, self.on_refused = app, limit, on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            self.on_refused()
            if int(declared) <= DRAIN_BYTES:
                await drain(receive, 0)
            # Left unread, the body makes uvicorn close the connection after the answer.
            return await too_large_response(limit, int(declared))(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    self.on_refused()
                    if message.get("more_body", False):
                        await drain(receive, received)
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted_receive, send)
