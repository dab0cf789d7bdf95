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
    POST /v1/classify   {"task": NAME | {prompt, target, labels}, "input": {...} | "inputs": [...],
                         "choices": optional labels, "model": optional LoRA adapter} -> per input
                         the label, probabilities and log-likelihoods
                         (gptj.execution.inference.classification)

Both classification routes and the guided choices of completions (serving/guided.py) run on
the engine thread as one job kind: every item waiting at a step, from every request, is scored
in one batched pass per adapter (`ServingClassifier`), each prompt prefilled once for all of
its candidates.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

import gptj.data as data
from gptj.data.tasks import _make_task, _template_fields
from gptj.execution.inference.pipelines import EntailmentPipeline, using_adapter
from gptj.execution.inference.scoring import choose

from .errors import APIError, bad_request
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


# Engine job items besides (premise, hypothesis) pairs: (CLASSIFY, JSON) of /v1/classify and
# (GUIDED, JSON) of a guided choice (serving/guided.py).
CLASSIFY = "\x00classify"
GUIDED = "\x00guided"


def inline_task(spec: dict):
    """A task from a request's {"prompt", "target", "labels"}: each template field reads the
    input's key of the same name."""
    def fail(message):
        raise data.DataError(message)

    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in ("prompt", "target")):
        fail("task must be a task name or an object with string 'prompt' and 'target' (and 'labels')")
    unknown = set(spec) - {"prompt", "target", "labels", "label_field"}
    if unknown:
        fail(f"task has unknown keys {sorted(unknown)}; allowed: label_field, labels, prompt, target")
    fields = _template_fields(spec["prompt"], fail) + _template_fields(spec["target"], fail)
    return _make_task("request", {**spec, "fields": {f: f for f in fields}}, "the request")


def request_task(spec):
    """The task a request names (built-in name) or spells out inline; ValueError if unknown/bad."""
    if isinstance(spec, str):
        if spec not in data.builtin_task_names():
            raise ValueError(f"unknown task {spec!r}; built-in tasks: {', '.join(data.builtin_task_names())}")
        return data.load_task(spec)
    return inline_task(spec)


@dataclass
class _Scoring:
    """One engine item: a prompt (text, tokenized with the others of the step, or token ids)
    and its candidates' tokens; `names` for a classification (None: a guided choice)."""

    prompt: str | list[int]
    candidates: list[list[int]]
    names: list[str] | None
    adapter: str | None = None
    top_k: int = 0
    entailment: bool = False

    def result(self, c) -> dict:
        if self.names is None:  # guided: every choice's probability and its tokens' scores (EOS left out)
            return {"logprobs": c.logprobs.tolist(),
                    "tokens": [[(value, top[:self.top_k]) for value, top in s.entries()[:-1]] for s in c.scores]}
        probabilities = dict(zip(self.names, c.logprobs.exp().tolist()))
        out = {"label": self.names[c.best], "probabilities": probabilities,
               "log_likelihoods": dict(zip(self.names, c.log_likelihoods.tolist()))}
        if self.entailment:
            out["scores"] = probabilities
        return out


class ServingClassifier(EntailmentPipeline):
    """The server's scorer on every rank: the entailment pairs, /v1/classify inputs and guided
    choices of one engine step in one `choose` pass per adapter (each prompt once, with its
    own candidates), sharing the request engine's prefix cache (its blocks, budget and hit
    rate on /metrics)."""

    def __init__(self, model, tokenizer, engine, batch_size: int = 8, adapters=None):
        super().__init__(model, tokenizer, batch_size=batch_size, adapters=adapters, prefix_cache=False)
        self.engine = engine

    def prefix_reuse(self, adapter):
        return self.engine.prefix_reuse(adapter)

    def _scoring(self, item) -> _Scoring:
        eos = self.tokenizer.eos_id
        if item[0] == GUIDED:
            spec = json.loads(item[1])
            return _Scoring(spec["prompt"], [ids + [eos] for ids in spec["choices"]], None, spec.get("adapter"),
                            spec.get("top_k", 0))
        if item[0] == CLASSIFY:
            spec = json.loads(item[1])
            task = request_task(spec["task"])
            names = spec.get("choices") or list(task.labels)
            prompt = task.render_prompt({**spec["input"], task.label_field: ""})
            adapter = spec.get("adapter")
        else:
            task, names, prompt, adapter = self.task, self.labels, self.prompt(item[0], item[1]), None
        texts = [task.target({task.label_field: name}) for name in names]
        candidates = [ids + [eos] for ids in self.tokenizer.encode(texts)]
        return _Scoring(prompt, candidates, names, adapter, entailment=item[0] not in (CLASSIFY, GUIDED))

    def __call__(self, items):
        work = [self._scoring(item) for item in items]
        texts = iter(self.tokenizer.encode([w.prompt for w in work if isinstance(w.prompt, str)]))
        prompts = [next(texts) if isinstance(w.prompt, str) else w.prompt for w in work]
        by_adapter: dict[str | None, list[int]] = {}
        for i, w in enumerate(work):
            by_adapter.setdefault(w.adapter, []).append(i)
        out: list = [None] * len(items)
        for adapter, which in by_adapter.items():
            try:
                running = using_adapter(self.adapters, adapter)
            except ValueError as err:  # unloaded since its request was checked: only its items fail
                for i in which:
                    out[i] = {"error": str(err)}
                continue
            with running:
                picked = choose(self.model, [prompts[i] for i in which], [work[i].candidates for i in which],
                                max_rows=self.batch_size, top_k=max(work[i].top_k for i in which),
                                prefix=self.prefix_reuse(adapter))
            for i, c in zip(which, picked):
                out[i] = work[i].result(c)
        return out


def classify_adapter(state: ServerState, body: dict) -> str | None:
    """The LoRA adapter a /v1/classify body's "model" names (None: the base); 400 otherwise."""
    name = body.get("model")
    if name is None:
        return None
    if not isinstance(name, str):
        raise bad_request(f"model must be a string (the served model or a loaded adapter), got "
                          f"{type(name).__name__}", "model")
    try:
        return state.check_model(name)
    except APIError as err:
        raise bad_request(err.message, "model") from None


def classify_items(state: ServerState, body: dict) -> tuple[list, str, list[str]]:
    """The engine items of a /v1/classify body, checked: a 400 naming the bad field."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    adapter = classify_adapter(state, body)
    if "task" not in body:
        raise bad_request("task is missing: a task name or {prompt, target, labels}", "task")
    try:
        task = request_task(body["task"])
    except (ValueError, data.DataError) as err:
        raise bad_request(str(err), "task") from None
    choices = body.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c.strip() for c in choices):
            raise bad_request("choices must be a non-empty list of non-empty strings", "choices")
        if len(set(choices)) != len(choices):
            raise bad_request("choices holds the same label twice", "choices")
    labels = choices or list(task.labels or [])
    if not labels:
        raise bad_request(f"task {task.name} has no labels: give choices", "choices")
    for k, name in enumerate(choices or []):
        state.check_text_length(name, f"choices[{k}]", "choices")
    if ("input" in body) == ("inputs" in body):
        raise bad_request("give exactly one of input (an object) or inputs (a list of objects)", "input")
    single = "input" in body
    inputs = [body["input"]] if single else body["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("inputs must be a non-empty list of objects", "inputs")
    needed = [f for f in _template_fields(task.prompt_template, ValueError) if f != task.label_field]
    label_ids = state.tokenizer.encode([task.target({task.label_field: name}) for name in labels])
    longest = max(map(len, label_ids)) + 1  # + EOS
    items = []
    for i, row in enumerate(inputs):
        where = "input" if single else f"inputs[{i}]"
        if not isinstance(row, dict):
            raise bad_request(f"{where} must be an object of the task's fields {needed}", where)
        for field in needed:
            if not isinstance(row.get(field), str) or not row[field].strip():
                state_of = "missing" if field not in row else "not a non-empty string"
                raise bad_request(f"{where}.{field} is {state_of} (task {task.name} needs {', '.join(needed)})",
                                  f"{where}.{field}")
        prompt = task.render_prompt({**row, task.label_field: ""})
        state.check_text_length(prompt, f"{where}'s prompt", where)  # before tokenizing it
        length = len(state.tokenizer.encode([prompt])[0])
        if length + longest > state.max_model_len:
            raise bad_request(f"{where} takes {length} prompt tokens; with its longest label ({longest} tokens) "
                              f"that is beyond the context of {state.max_model_len} tokens", where,
                              "context_length_exceeded")
        spec = {"task": body["task"], "input": {f: row[f] for f in needed}, "choices": choices, "adapter": adapter}
        items.append((CLASSIFY, json.dumps(spec)))
    return items, task.name, labels


@router.post("/v1/classify")
async def classify(request: Request, state: State):
    loop = state.require_loop()
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("the body is not JSON") from None
    items, name, labels = await run_in_threadpool(classify_items, state, body)  # tokenizes: off the event loop
    results = await score_items(state, loop, items)
    return {"object": "classification", "task": name, "labels": labels, "results": results}


async def score_items(state: ServerState, loop, items: list) -> list[dict]:
    """The scorer's results for `items`, run by the engine thread with every other scoring
    item of its step: a 504 past the request timeout, a 400 for input the scorer refused."""
    try:
        results = await asyncio.wait_for(loop.entail(items), state.config.server.request_timeout)
    except TimeoutError:
        raise state.timeout_error() from None
    except ValueError as err:
        raise bad_request(str(err)) from None
    failed = next((r["error"] for r in results if "error" in r), None)
    if failed is not None:
        raise bad_request(failed, "model")
    return results
