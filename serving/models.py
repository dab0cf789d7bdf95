"""GET /v1/models: the base model and the LoRA adapters served over it."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .state import ServerState, State, authorized

router = APIRouter(dependencies=[Depends(authorized)])


def model_card(state: ServerState, name: str, parent: str | None = None) -> dict:
    card = {"id": name, "object": "model", "created": 0, "owned_by": "gptj"}
    if parent is not None:
        card["parent"] = parent
    card["max_model_len"] = state.max_model_len
    return card


@router.get("/v1/models")
async def models(state: State):
    state.require_loop()
    return {"object": "list", "data": [model_card(state, state.model_name)]
            + [model_card(state, name, state.model_name) for name in state.adapters]}
