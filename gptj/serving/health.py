"""GET /health (200 once the engine runs, 503 while loading or after a failure) and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .state import State

router = APIRouter()


@router.get("/health")
async def health(state: State):
    if not state.ready or not state.loop.alive:
        status = "error" if state.load_error or state.ready else "loading"
        return JSONResponse({"status": status}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics_route(state: State):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
