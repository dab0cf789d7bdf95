"""POST /v1/completions and /v1/chat/completions: OpenAI's shapes over the engine.

Handlers check the request (every bad input is a 400 naming the field, never a 500), turn it
into engine requests (one per choice, `prepare`), hand them to the engine loop and turn the
events that come back into one JSON body or server-sent events (serving/responses.py). A
request with `guided_choice` is answered by scoring its choices instead (serving/guided.py).
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from gptj.execution.inference.request_engine import Request as EngineRequest

from .guided import GuidedChoice, answer, check_fits, guided_choice
from .responses import FINISH_REASONS, Choice, collect, event_stream, known_stream, submit, usage
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    check_completion_max_tokens,
    check_context,
    check_logprobs,
    check_max_tokens,
    prompt_token_ids,
)
from .scoring import echoed_logprobs, join_logprobs, prompt_logprobs_for, top_logprobs_dict
from .state import ServerState, State, authorized
from .text import TextStream, render_chat

router = APIRouter(dependencies=[Depends(authorized)])


@dataclass
class Prepared:
    """One request's engine requests, submitted, and what its response is built from."""

    state: ServerState
    loop: object
    response_id: str
    requests: list
    choices: list[Choice]
    deadline: float
    created: int
    model: str  # what the response's `model` says: the adapter asked for, else the base
    queue: object = None

    async def collect(self) -> None:
        await collect(self.state, self.loop, self.queue, self.choices, self.deadline)

    def stream(self, opening, on_event, usage_chunk) -> StreamingResponse:
        events = event_stream(self.state, self.loop, self.queue, self.choices, self.deadline, opening, on_event,
                              usage_chunk)
        return StreamingResponse(events, media_type="text/event-stream")


def engine_requests(prefix, prompts, n, max_tokens, sampling, seed, stops, logprobs, ignore_eos,
                    prompt_logprobs=None, adapter=None) -> list[EngineRequest]:
    """One engine request per choice; the n choices of one prompt share its seed, apart by stream."""
    requests = []
    for i, prompt in enumerate(prompts):
        prompt_seed = seed if seed is not None else secrets.randbits(62)
        for j in range(n):
            requests.append(EngineRequest(
                f"{prefix}-{i * n + j}", prompt, max_tokens, sampling, seed=prompt_seed, stream_id=j,
                stop_strings=stops, logprobs=logprobs, ignore_eos=ignore_eos, prompt_logprobs=prompt_logprobs,
                adapter=adapter,
            ))
    return requests


def prepare(state: ServerState, body, prompts, max_tokens, stops, logprobs, prompt_logprobs=None) -> Prepared:
    """Check what both APIs share and build the engine requests (not yet submitted)."""
    server = state.config.server
    loop = state.require_loop()
    adapter = state.check_model(body.model)
    body.check_n(server.max_n)
    sampling = body.sampling(state.config.generation)
    for i, prompt in enumerate(prompts):
        check_context(len(prompt), max_tokens, state.max_model_len,
                      "the prompt" if len(prompts) == 1 else f"prompt[{i}]")
    kind = "chatcmpl" if isinstance(body, ChatCompletionRequest) else "cmpl"
    response_id = f"{kind}-{uuid.uuid4().hex}"
    requests = engine_requests(response_id, prompts, body.n, max_tokens, sampling, body.seed, stops, logprobs,
                               body.ignore_eos, prompt_logprobs, adapter)
    decode = state.tokenizer.decode
    choices = [Choice(i, request.request_id, TextStream(decode, stops)) for i, request in enumerate(requests)]
    deadline = time.monotonic() + server.request_timeout
    return Prepared(state, loop, response_id, requests, choices, deadline, int(time.time()),
                    adapter or state.model_name)


async def prompt_tokens(state: ServerState, prompt, where: str | None = None,
                        param: str = "prompt") -> list[list[int]]:
    """The prompt's token ids, tokenized in a worker thread: a long text would hold the event
    loop (every other request, /health included) for as long as it takes. A text that cannot
    fit the context is refused before it is tokenized."""
    def check(text, named):
        state.check_text_length(text, where or named, param)

    return await run_in_threadpool(prompt_token_ids, prompt, state.tokenizer.encode, state.vocab_size, check)


def completion_logprobs(decode, entries, offset: int) -> dict:
    """The completions API's logprobs object for (token, logprob, top) entries."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, logprob, top in entries:
        text = decode([token])
        tokens.append(text)
        token_logprobs.append(logprob)
        tops.append(top_logprobs_dict(decode, top))
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(decode, entries) -> dict:
    """The chat API's logprobs object for (token, logprob, top) entries."""
    content = []
    for token, logprob, alternatives in entries:
        text = decode([token])
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": decode([t]), "logprob": p,
                                          "bytes": list(decode([t]).encode())} for t, p in alternatives]})
    return {"content": content}


def set_limit(body, field: str) -> int | None:
    """A token limit the client set (None when left out: the default does not bound a choice)."""
    return getattr(body, field) if field in body.model_fields_set else None


async def guided_answers(state: ServerState, body, guided: GuidedChoice, prompts, top_k: int, param: str):
    """(what the response's `model` says, the answers) of a guided choice (serving/guided.py)."""
    loop = state.require_loop()
    adapter = state.check_model(body.model)
    body.check_n(state.config.server.max_n)
    temperature = body.sampling(state.config.generation).temperature
    check_fits(state, guided, prompts, param)
    answers = await answer(state, loop, guided, prompts, body.n, temperature, body.seed, top_k, adapter)
    return adapter or state.model_name, answers


async def guided_completion(state: ServerState, body: CompletionRequest, guided: GuidedChoice, prompts, logprobs):
    """A completion that is one of the body's choices; streamed, each choice is one chunk."""
    model, answers = await guided_answers(state, body, guided, prompts, logprobs or 0, "prompt")
    decode = state.tokenizer.decode
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model}
    choices = [{"index": a.index, "text": a.text, "finish_reason": "stop",
                "logprobs": completion_logprobs(decode, a.entries, 0) if logprobs is not None else None}
               for a in answers]
    counted = usage([len(p) for p in prompts], answers)
    if not body.stream:
        return {**head, "choices": choices, "usage": counted}
    return known_stream([{**head, "choices": [c]} for c in choices]
                        + ([{**head, "choices": [], "usage": counted}] if body.include_usage else []))


async def guided_chat(state: ServerState, body: ChatCompletionRequest, guided: GuidedChoice, prompts, logprobs):
    """A chat answer that is one of the body's choices; streamed, each choice is one chunk."""
    model, answers = await guided_answers(state, body, guided, prompts, logprobs or 0, "messages")
    decode = state.tokenizer.decode
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}

    def choice(a, key: str) -> dict:
        return {"index": a.index, key: {"role": "assistant", "content": a.text}, "finish_reason": "stop",
                "logprobs": chat_logprobs(decode, a.entries) if logprobs is not None else None}

    counted = usage([len(p) for p in prompts], answers)
    if not body.stream:
        return {**head, "object": "chat.completion", "choices": [choice(a, "message") for a in answers],
                "usage": counted}
    chunk = {**head, "object": "chat.completion.chunk"}
    return known_stream([{**chunk, "choices": [choice(a, "delta")]} for a in answers]
                        + ([{**chunk, "choices": [], "usage": counted}] if body.include_usage else []))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, state: State):
    state.require_loop()
    check_completion_max_tokens(body.max_tokens, body.echo)
    logprobs = check_logprobs(body.logprobs, "logprobs")
    given = body.choice_texts()
    if given is not None:  # tokenizes the choices: off the event loop
        guided = await run_in_threadpool(guided_choice, state, body, given,
                                         {"max_tokens": set_limit(body, "max_tokens")}, body.echo)
        return await guided_completion(state, body, guided, await prompt_tokens(state, body.prompt), logprobs)
    prompts = await prompt_tokens(state, body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    stops = body.stop_strings()
    scored = prompt_logprobs_for(body.echo, logprobs, max_tokens)
    job = prepare(state, body, prompts, max_tokens, stops, logprobs, scored)
    decode = state.tokenizer.decode
    for choice in job.choices:
        choice.prefix = decode(job.requests[choice.index].prompt) if body.echo else ""
    lengths = [len(p) for p in prompts]
    job.queue = submit(job.loop, job.requests)

    def echoed(choice) -> dict:
        return echoed_logprobs(decode, job.requests[choice.index].prompt, choice.prompt_logprobs)

    def choice_logprobs(choice) -> dict | None:
        if logprobs is None:
            return None
        generated = completion_logprobs(decode, choice.logprobs, len(choice.prefix))
        return join_logprobs(echoed(choice), generated) if body.echo else generated

    head = {"id": job.response_id, "object": "text_completion", "created": job.created, "model": job.model}
    if not body.stream:
        await job.collect()
        return {**head, "choices": [{"index": c.index, "text": c.prefix + c.output, "finish_reason": c.finish,
                                     "logprobs": choice_logprobs(c)} for c in job.choices],
                "usage": usage(lengths, job.choices)}

    def chunk(choice, text, finish, logprobs_part=None) -> dict:
        return {**head, "choices": [{"index": choice.index, "text": text, "finish_reason": finish,
                                     "logprobs": logprobs_part}]}

    def on_event(choice, delta, event):
        # With echo and logprobs the echoed prompt waits for its scores (the first event).
        opening = [chunk(choice, choice.prefix, None, echoed(choice))] \
            if body.echo and logprobs is not None and event.prompt_logprobs is not None else []
        part = None
        if event.logprob is not None:
            offset = len(choice.prefix) + len(choice.output) - len(delta)
            part = completion_logprobs(decode, choice.logprobs[-1:], offset)
        finish = FINISH_REASONS.get(event.finish_reason)
        return opening + ([chunk(choice, delta, finish, part)] if delta or finish or part else [])

    def usage_chunk():
        return {**head, "choices": [], "usage": usage(lengths, job.choices)}

    opening = [chunk(c, c.prefix, None) for c in job.choices] if body.echo and logprobs is None else []
    return job.stream(opening, on_event, usage_chunk if body.include_usage else None)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, state: State):
    state.require_loop()
    check_max_tokens(body.max_tokens, "max_tokens")
    check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
    top = check_logprobs(body.top_logprobs, "top_logprobs")
    logprobs = (top or 0) if body.logprobs else None
    template = state.config.server.chat_template
    given = body.choice_texts()
    guided = None
    if given is not None:
        limits = {field: set_limit(body, field) for field in ("max_tokens", "max_completion_tokens")}
        guided = await run_in_threadpool(guided_choice, state, body, given, limits)
    prompts = await prompt_tokens(state, render_chat(body.messages, template), "the chat prompt", "messages")
    if guided is not None:
        return await guided_chat(state, body, guided, prompts, logprobs)
    limit = body.max_completion_tokens or body.max_tokens
    if limit is None:  # the preset's default, clamped to the room the prompt leaves
        limit = max(1, min(state.config.generation.max_new_tokens, state.max_model_len - len(prompts[0])))
    stops = body.stop_strings() + [s for s in template.stop if s]
    job = prepare(state, body, prompts, limit, stops, logprobs)
    lengths, decode = [len(prompts[0])], state.tokenizer.decode
    job.queue = submit(job.loop, job.requests)

    def head(kind: str) -> dict:
        return {"id": job.response_id, "object": kind, "created": job.created, "model": job.model}

    if not body.stream:
        await job.collect()
        return {**head("chat.completion"), "choices": [{
            "index": c.index, "message": {"role": "assistant", "content": c.output}, "finish_reason": c.finish,
            "logprobs": chat_logprobs(decode, c.logprobs) if logprobs is not None else None,
        } for c in job.choices], "usage": usage(lengths, job.choices)}

    def chunk(choice, delta: dict, finish, logprobs_part=None) -> dict:
        return {**head("chat.completion.chunk"),
                "choices": [{"index": choice.index, "delta": delta, "finish_reason": finish,
                             "logprobs": logprobs_part}]}

    def on_event(choice, delta, event):
        part = chat_logprobs(decode, [choice.logprobs[-1]]) if event.logprob is not None else None
        payloads = [chunk(choice, {"content": delta}, None, part)] if delta or part else []
        finish = FINISH_REASONS.get(event.finish_reason)
        return payloads + ([chunk(choice, {}, finish)] if finish else [])

    def usage_chunk():
        return {**head("chat.completion.chunk"), "choices": [], "usage": usage(lengths, job.choices)}

    opening = [chunk(c, {"role": "assistant", "content": ""}, None) for c in job.choices]
    return job.stream(opening, on_event, usage_chunk if body.include_usage else None)
