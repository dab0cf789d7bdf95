"""GET /v1/models: the base model and the LoRA adapters served over it; POST
/v1/load_lora_adapter and /v1/unload_lora_adapter change the adapters while the server runs
(vLLM's shapes; serving/adapter_slots.py does the change on the engine thread)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from .adapter_slots import AdapterChangeError
from .errors import APIError, bad_request
from .schemas import LoadAdapterRequest, UnloadAdapterRequest
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


async def _change(state: ServerState, change) -> dict:
    """Await an adapter change on the engine thread; its refusal as the HTTP error it names."""
    try:
        return await asyncio.wait_for(change, state.config.server.request_timeout)
    except AdapterChangeError as err:
        raise APIError(err.status, str(err), "lora_name" if err.status == 404 else None) from None
    except TimeoutError:
        raise state.timeout_error() from None


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadAdapterRequest, state: State):
    loop = state.require_loop()
    name = body.lora_name
    if not name.strip():
        raise bad_request("lora_name is empty", "lora_name")
    if name == state.model_name:
        raise bad_request(f"lora_name {name!r} is the base model's name; choose another", "lora_name")
    if name in state.adapters:
        raise bad_request(f"adapter {name!r} is already loaded; unload it first to replace it", "lora_name")
    await _change(state, loop.load_adapter(name, body.lora_path))
    state.adapters.append(name)
    return model_card(state, name, state.model_name)


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadAdapterRequest, state: State):
    """New requests for the adapter get 404 at once; the answer comes when its last one finished."""
    loop = state.require_loop()
    name = body.lora_name
    if name not in state.adapters:
        loaded = ", ".join(repr(n) for n in state.adapters) or "none"
        raise APIError(404, f"adapter {name!r} is not loaded (loaded: {loaded})", "lora_name", "model_not_found")
    state.adapters.remove(name)
    await _change(state, loop.unload_adapter(name))
    return {"id": name, "object": "model", "deleted": True}
