"""Prompt scoring over HTTP: the completions API's echoed log-probabilities, and the tokenizer
routes (vLLM's shapes) that let clients such as lm-evaluation-harness count tokens.

`echo: true` with `logprobs: k` returns the prompt's tokens before the generated ones, in the
OpenAI shape: the first prompt token has no prediction, so its `token_logprobs` and
`top_logprobs` entries are null; every other prompt token has its log-probability given the
tokens before it and the k most likely tokens at that position (from the engine's prefill,
execution.scoring). `max_tokens: 0` with `echo` scores the prompt without generating.

    POST /tokenize      {"prompt": str}   -> {"tokens", "count", "max_model_len", "token_strs"}
    POST /detokenize    {"tokens": [int]} -> {"prompt"}
    GET  /tokenizer_info                  -> the special tokens and the context length
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, FastAPI

from .schemas import DetokenizeRequest, TokenizeRequest


def prompt_logprobs_for(echo: bool, logprobs: int | None, max_tokens: int) -> int | None:
    """The engine request's `prompt_logprobs`: top-k per prompt token when echo asks for
    logprobs; 0 (scores unused) for an echo with max_tokens 0, which only scores; else None."""
    if not echo:
        return None
    if logprobs is not None:
        return logprobs
    return 0 if max_tokens == 0 else None


def top_logprobs_dict(decode: Callable[[list[int]], str], top: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: log p} of the top tokens, best first. Different tokens may decode to the
    same text (e.g. halves of one character both show as U+FFFD): the text keeps the best
    value, so the dict's maximum is still the top-1's."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(decode([token]), logprob)
    return out


def echoed_logprobs(decode: Callable[[list[int]], str], prompt: list[int], scores: list | None) -> dict:
    """The completions API's logprobs object for the prompt tokens (text offsets from 0).

    scores: the engine's `Event.prompt_logprobs`, (log p, [(token, log p), ...]) for prompt
    tokens 1..L-1."""
    scores = scores or []
    tokens = [decode([t]) for t in prompt]
    offsets, offset = [], 0
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    token_logprobs = [None] + [value for value, _ in scores]
    top_logprobs = [None] + [top_logprobs_dict(decode, top) for _, top in scores]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def join_logprobs(first: dict, second: dict) -> dict:
    """Two logprobs objects one after the other (the prompt's, then the generated tokens')."""
    return {key: first[key] + second[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def add_tokenizer_routes(app: FastAPI, state, ready: Callable, check_model: Callable, authorized: Callable) -> None:
    """POST /tokenize, POST /detokenize and GET /tokenizer_info on `app` (serving.app's state
    and checks)."""
    from .errors import bad_request

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(body: TokenizeRequest):
        ready()
        check_model(body.model)
        tokens = state.tokenizer.encode([body.prompt])[0] if body.prompt else []
        strs = [state.tokenizer.decode([t]) for t in tokens] if body.return_token_strs else None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len, "token_strs": strs}

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(body: DetokenizeRequest):
        ready()
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise bad_request(f"tokens holds token id {bad[0]} outside the vocabulary of {state.vocab_size}",
                              "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info", dependencies=[Depends(authorized)])
    async def tokenizer_info():
        # What lm-evaluation-harness's remote tokenizer reads: the special tokens (it encodes
        # them through /tokenize to find their ids); no chat template is served.
        ready()
        tok = state.tokenizer
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
                "bos_token": tok.eos_token, "pad_token": tok.pad_token, "model_max_length": state.max_model_len,
                "vocab_size": state.vocab_size, "add_bos_token": False, "chat_template": None}
