"""The FastAPI app: its routes by group, the state they share, errors in the OpenAI shape.

    completions.py  POST /v1/completions, /v1/chat/completions
    models.py       GET /v1/models
    scoring.py      POST /tokenize, /detokenize, /v1/entailment; GET /tokenizer_info
    health.py       GET /health, /metrics

Every route reads the `ServerState` at `app.state.server` (serving/state.py).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from . import completions, health, models, scoring
from .body_limit import BodyLimit, BodyTooLarge, body_too_large_handler
from .errors import APIError, CatchUnexpectedErrors, api_error_handler, validation_error_handler
from .state import ServerState

__all__ = ["ServerState", "create_app"]


async def counted_api_error(request, err):
    request.app.state.server.metrics.rejected.labels(str(err.status)).inc()
    return await api_error_handler(request, err)


async def counted_validation_error(request, err):
    request.app.state.server.metrics.rejected.labels("400").inc()
    return await validation_error_handler(request, err)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="GPT-J server", docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_exception_handler(APIError, counted_api_error)
    app.add_exception_handler(RequestValidationError, counted_validation_error)
    app.add_exception_handler(BodyTooLarge, body_too_large_handler)
    app.add_middleware(CatchUnexpectedErrors)
    app.add_middleware(BodyLimit, limit=lambda: state.max_body_bytes,
                       on_refused=lambda: state.metrics.rejected.labels("413").inc())
    for group in (health, models, completions, scoring):
        app.include_router(group.router)
    return app
