"""Prompt scoring over HTTP: the completions API's echoed log-probabilities, the tokenizer
routes (vLLM's shapes) that let clients such as lm-evaluation-harness count tokens, and
entailment.

`echo: true` with `logprobs: k` returns the prompt's tokens before the generated ones, in the
OpenAI shape: the first prompt token has no prediction, so its `token_logprobs` and
`top_logprobs` entries are null; every other prompt token has its log-probability given the
tokens before it and the k most likely tokens at that position (from the engine's prefill,
gptj.execution.inference.scoring). `max_tokens: 0` with `echo` scores the prompt without generating.

    POST /tokenize      {"prompt": str}   -> {"tokens", "count", "max_model_len", "token_strs"}
    POST /detokenize    {"tokens": [int]} -> {"prompt"}
    GET  /tokenizer_info                  -> the special tokens and the context length
    POST /v1/entailment {"premise", "hypothesis"} or a list of them -> the label and its scores
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from .errors import bad_request
from .schemas import DetokenizeRequest, EntailmentPair, TokenizeRequest
from .state import ServerState, State, authorized

router = APIRouter(dependencies=[Depends(authorized)])


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


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: State):
    state.require_loop()
    state.check_model(body.model)
    # Counting tokens is its use, so a text longer than the context is tokenized too, off the event loop.
    tokens = (await run_in_threadpool(state.tokenizer.encode, [body.prompt]))[0] if body.prompt else []
    strs = [state.tokenizer.decode([t]) for t in tokens] if body.return_token_strs else None
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State):
    state.require_loop()
    state.check_model(body.model)
    bad = [t for t in body.tokens if not 0 <= t < state.vocab_size]
    if bad:
        raise bad_request(f"tokens holds token id {bad[0]} outside the vocabulary of {state.vocab_size}", "tokens")
    return {"prompt": state.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(state: State):
    # What lm-evaluation-harness's remote tokenizer reads: the special tokens (it encodes
    # them through /tokenize to find their ids); no chat template is served.
    state.require_loop()
    tok = state.tokenizer
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
            "bos_token": tok.eos_token, "pad_token": tok.pad_token, "model_max_length": state.max_model_len,
            "vocab_size": state.vocab_size, "add_bos_token": False, "chat_template": None}


def check_pairs(state: ServerState, pairs: list[EntailmentPair], single: bool) -> None:
    """400 for an empty premise or hypothesis, or a pair too long for the context with its label."""
    if not pairs:
        raise bad_request("no premise/hypothesis pairs given")
    nli = state.entailment
    longest_label = max(len(ids) for ids in nli.label_ids)
    for i, pair in enumerate(pairs):
        where = "" if single else f"[{i}]."
        for name in ("premise", "hypothesis"):
            if not getattr(pair, name).strip():
                raise bad_request(f"{where}{name} is empty", name)
        prompt = nli.prompt(pair.premise, pair.hypothesis)
        state.check_text_length(prompt, f"{where}premise + hypothesis", "premise")
        length = len(state.tokenizer.encode([prompt])[0])
        if length + longest_label > state.max_model_len:
            raise bad_request(f"{where}premise + hypothesis take {length} prompt tokens; with the label that "
                              f"is beyond the context of {state.max_model_len} tokens", "premise",
                              "context_length_exceeded")


@router.post("/v1/entailment")
async def entailment(body: EntailmentPair | list[EntailmentPair], state: State):
    loop = state.require_loop()
    single = isinstance(body, EntailmentPair)
    pairs = [body] if single else body
    await run_in_threadpool(check_pairs, state, pairs, single)  # tokenizes: off the event loop
    try:
        results = await asyncio.wait_for(loop.entail([(p.premise, p.hypothesis) for p in pairs]),
                                         state.config.server.request_timeout)
    except TimeoutError:
        raise state.timeout_error() from None
    except ValueError as err:  # e.g. a pair longer than the model's context
        raise bad_request(str(err)) from None
    return results[0] if single else results
