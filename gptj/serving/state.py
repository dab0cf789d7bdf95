"""What every route reads: the server's state (`app.state.server`) and the checks on it.

Routes reach the state through the `server_state` dependency; `authorized` is the API-key
dependency the /v1 and tokenizer routes carry.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from .body_limit import MAX_BODY_BYTES
from .engine_loop import EngineLoop
from .errors import APIError
from .metrics import ServerMetrics


@dataclass
class ServerState:
    """What the routes need; filled in when the model has loaded (`ready`)."""

    config: object  # gptj.execution.inference.config.InferenceConfig
    model_name: str
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    loop: EngineLoop | None = None
    tokenizer: object = None
    max_model_len: int = 0
    vocab_size: int = 0
    entailment: object = None  # gptj.execution.inference.pipelines.EntailmentPipeline
    ready: bool = False
    load_error: str | None = None
    adapters: list[str] = field(default_factory=list)  # LoRA adapters served over the base, by name
    max_body_bytes: int = MAX_BODY_BYTES  # larger request bodies are a 413, unread (serving/body_limit.py)
    _token_chars: int | None = None

    def longest_token_chars(self) -> int:
        """An upper bound on the characters one token decodes to: a text longer than the context
        times this cannot fit, and is refused without tokenizing it."""
        if self._token_chars is None:
            backend = getattr(self.tokenizer, "backend", None)
            if backend is None:
                return 1 << 30
            longest = max(map(len, backend.get_vocab(with_added_tokens=True)))
            # A normalizer may turn several characters into one before the text is split.
            self._token_chars = longest * (1 if backend.normalizer is None else 4)
        return self._token_chars

    def check_text_length(self, text: str, where: str, param: str) -> None:
        """400 for a text that holds more tokens than the context for certain (before tokenizing it)."""
        most = self.max_model_len * self.longest_token_chars()
        if len(text) > most:
            raise APIError(400, f"{where} is {len(text)} characters; at most {self.longest_token_chars()} "
                                f"characters a token, that is more than this model's context of "
                                f"{self.max_model_len} tokens", param, "context_length_exceeded")

    def require_loop(self) -> EngineLoop:
        """The engine loop, or a 503 while the model loads, after it failed, or once the engine stopped."""
        if not self.ready:
            message = f"model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, message, headers={"Retry-After": "5"})
        if not self.loop.alive:
            raise APIError(503, f"the engine stopped: {self.loop.error}")
        return self.loop

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter `name` chooses (None: the base); 404 for a model not served here."""
        if name in self.adapters:
            return name
        if name is not None and name != self.model_name:
            served = ", ".join(repr(n) for n in [self.model_name, *self.adapters])
            raise APIError(404, f"model {name!r} does not exist; this server serves {served}",
                           "model", "model_not_found")
        return None

    def timeout_error(self) -> APIError:
        return APIError(504, f"the request took longer than the timeout of {self.config.server.request_timeout:g} s",
                        code="timeout")


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]  # a route's parameter type for the state


def authorized(request: Request) -> None:
    """401 unless the request carries the server's API key (when it has one)."""
    key = server_state(request).config.server.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    if not secrets.compare_digest(header.encode(), f"Bearer {key}".encode()):
        raise APIError(401, "invalid API key: send the server's key as 'Authorization: Bearer KEY'",
                       code="invalid_api_key")
