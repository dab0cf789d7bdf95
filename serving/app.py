"""The FastAPI routes: OpenAI completions and chat completions, entailment, models, health, metrics.

Handlers check the request (every bad input is a 400 naming the field, never a 500), turn
it into engine requests (one per choice), hand them to the EngineLoop and turn the events
that come back into the OpenAI response shape: one JSON body, or server-sent events
(`data: {...}` lines ending with `data: [DONE]`). A client that disconnects mid-stream, or a
request past its timeout, is cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from execution.request_engine import Request as EngineRequest

from .engine_loop import EngineLoop, QueueFull
from .errors import (
    APIError,
    CatchUnexpectedErrors,
    api_error_handler,
    bad_request,
    error_body,
    validation_error_handler,
)
from .metrics import ServerMetrics
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EntailmentPair,
    check_completion_max_tokens,
    check_context,
    check_logprobs,
    check_max_tokens,
    prompt_token_ids,
)
from .scoring import (
    add_tokenizer_routes,
    echoed_logprobs,
    join_logprobs,
    prompt_logprobs_for,
    top_logprobs_dict,
)
from .text import TextStream, render_chat

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class ServerState:
    """What the routes need; filled in when the model has loaded (`ready`)."""

    config: object  # execution.inference_config.InferenceConfig
    model_name: str
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    loop: EngineLoop | None = None
    tokenizer: object = None
    max_model_len: int = 0
    vocab_size: int = 0
    entailment: object = None  # execution.pipelines.EntailmentPipeline
    ready: bool = False
    load_error: str | None = None
    adapters: list[str] = field(default_factory=list)  # LoRA adapters served over the base, by name


class _Choice:
    """One choice of a response, built from its engine request's events."""

    def __init__(self, index: int, request_id: str, text: TextStream, prefix: str = ""):
        self.index, self.request_id, self.text, self.prefix = index, request_id, text, prefix
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list]] = []
        self.prompt_logprobs: list | None = None  # the prompt's scores (echo with logprobs)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.output = ""

    def consume(self, event) -> str:
        delta = ""
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.token is not None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append((event.token, event.logprob, event.top_logprobs or []))
            delta = self.text.add(event.token)
        if event.finish_reason is not None:
            self.finish_reason, self.error = event.finish_reason, event.error
            delta += self.text.finish()
        self.output += delta
        return delta


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="GPT-J server", docs_url=None, redoc_url=None)
    metrics = state.metrics
    server = state.config.server
    defaults = state.config.generation

    async def counted_api_error(request, err):
        metrics.rejected.labels(str(err.status)).inc()
        return await api_error_handler(request, err)

    async def counted_validation_error(request, err):
        metrics.rejected.labels("400").inc()
        return await validation_error_handler(request, err)

    app.add_exception_handler(APIError, counted_api_error)
    app.add_exception_handler(RequestValidationError, counted_validation_error)
    app.add_middleware(CatchUnexpectedErrors)

    def authorized(request: Request) -> None:
        if server.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {server.api_key}".encode()):
            raise APIError(401, "invalid API key: send the server's key as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def ready() -> EngineLoop:
        if not state.ready:
            message = f"model failed to load: {state.load_error}" if state.load_error else "the model is loading"
            raise APIError(503, message, headers={"Retry-After": "5"})
        if not state.loop.alive:
            raise APIError(503, f"the engine stopped: {state.loop.error}")
        return state.loop

    def check_model(name: str | None) -> str | None:
        """The LoRA adapter `name` chooses (None: the base); 404 for a model not served here."""
        if name in state.adapters:
            return name
        if name is not None and name != state.model_name:
            served = ", ".join(repr(n) for n in [state.model_name, *state.adapters])
            raise APIError(404, f"model {name!r} does not exist; this server serves {served}",
                           "model", "model_not_found")
        return None

    # ---- plain routes ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not state.ready or not state.loop.alive:
            status = "error" if state.load_error or state.ready else "loading"
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        ready()
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": 0, "owned_by": "gptj",
            "max_model_len": state.max_model_len,
        }] + [{"id": name, "object": "model", "created": 0, "owned_by": "gptj", "parent": state.model_name,
               "max_model_len": state.max_model_len} for name in state.adapters]}

    # ---- generation --------------------------------------------------------------------------
    def engine_requests(prefix, prompts, n, max_tokens, sampling, seed, stops, logprobs, ignore_eos,
                        prompt_logprobs=None):
        requests = []
        for i, prompt in enumerate(prompts):
            prompt_seed = seed if seed is not None else secrets.randbits(62)
            for j in range(n):
                requests.append(EngineRequest(
                    f"{prefix}-{i * n + j}", prompt, max_tokens, sampling, seed=prompt_seed, stream_id=j,
                    stop_strings=stops, logprobs=logprobs, ignore_eos=ignore_eos, prompt_logprobs=prompt_logprobs,
                ))
        return requests

    def submit(loop: EngineLoop, requests):
        try:
            return loop.submit(requests)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None

    async def collect(loop, queue, choices, deadline):
        """Wait until every choice finished; cancel them all on timeout or error."""
        try:
            async for _ in events_of(loop, queue, choices, deadline):
                pass
        except TimeoutError:
            raise APIError(504, f"the request took longer than the timeout of {server.request_timeout:g} s",
                           code="timeout") from None
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            raise APIError(500, f"generation failed: {failed[0].error}", code="generation_failed")

    async def events_of(loop, queue, choices, deadline):
        """(choice, delta) as tokens come; cancels unfinished choices when the consumer leaves."""
        by_id = {c.request_id: c for c in choices}
        pending = set(by_id)
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                event = await asyncio.wait_for(queue.get(), remaining)
                choice = by_id[event.request_id]
                delta = choice.consume(event)
                if event.finish_reason is not None:
                    pending.discard(event.request_id)
                yield choice, delta, event
        finally:
            for request_id in pending:
                loop.release(request_id)

    def sse(payload) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def usage(prompt_lengths, choices) -> dict:
        prompt = sum(prompt_lengths)
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def event_stream(loop, queue, choices, deadline, opening, on_event, usage_chunk):
        """The server-sent events of one streamed request: the `opening` chunks, the chunks
        `on_event(choice, delta, event)` makes of each engine event, `usage_chunk()` at the end
        (None: not asked for), then [DONE]. An engine error or the request timeout ends the
        stream with an error event instead."""
        try:
            for payload in opening:
                yield sse(payload)
            async for choice, delta, event in events_of(loop, queue, choices, deadline):
                if event.finish_reason == "error":
                    yield sse(error_body(500, f"generation failed: {event.error}", code="generation_failed"))
                    break
                for payload in on_event(choice, delta, event):
                    yield sse(payload)
            else:
                if usage_chunk is not None:
                    yield sse(usage_chunk())
        except TimeoutError:
            yield sse(error_body(504, f"the request took longer than the timeout of {server.request_timeout:g} s",
                                 code="timeout"))
        yield "data: [DONE]\n\n"

    def prepare(body, prompts, max_tokens, stops, logprobs, prompt_logprobs=None):
        loop = ready()
        adapter = check_model(body.model)
        body.check_n(server.max_n)
        sampling = body.sampling(defaults)
        for i, prompt in enumerate(prompts):
            check_context(len(prompt), max_tokens, state.max_model_len,
                          "the prompt" if len(prompts) == 1 else f"prompt[{i}]")
        kind = "chatcmpl" if isinstance(body, ChatCompletionRequest) else "cmpl"
        response_id = f"{kind}-{uuid.uuid4().hex}"
        requests = engine_requests(response_id, prompts, body.n, max_tokens, sampling, body.seed, stops, logprobs,
                                   body.ignore_eos, prompt_logprobs)
        for request in requests:
            request.adapter = adapter
        decode = state.tokenizer.decode
        choices = []
        for request in requests:
            choices.append(_Choice(len(choices), request.request_id, TextStream(decode, stops)))
        deadline = time.monotonic() + server.request_timeout
        return loop, response_id, requests, choices, deadline

    def completion_logprobs(entries, offset: int) -> dict:
        """The completions API's logprobs object for (token, logprob, top) entries."""
        decode = state.tokenizer.decode
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token, logprob, top in entries:
            text = decode([token])
            tokens.append(text)
            token_logprobs.append(logprob)
            tops.append(top_logprobs_dict(decode, top))
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        ready()
        check_completion_max_tokens(body.max_tokens, body.echo)
        logprobs = check_logprobs(body.logprobs, "logprobs")
        prompts = prompt_token_ids(body.prompt, state.tokenizer.encode, state.vocab_size)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        stops = body.stop_strings()
        scored = prompt_logprobs_for(body.echo, logprobs, max_tokens)
        loop, response_id, requests, choices, deadline = prepare(body, prompts, max_tokens, stops, logprobs, scored)
        for choice in choices:
            choice.prefix = state.tokenizer.decode(requests[choice.index].prompt) if body.echo else ""
        created, lengths = int(time.time()), [len(p) for p in prompts]
        queue = submit(loop, requests)

        def chunk(choice, text, finish, logprobs_part=None) -> dict:
            return {"id": response_id, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [{"index": choice.index, "text": text, "finish_reason": finish,
                                 "logprobs": logprobs_part}]}

        def echoed(choice) -> dict:
            return echoed_logprobs(state.tokenizer.decode, requests[choice.index].prompt, choice.prompt_logprobs)

        def choice_logprobs(choice) -> dict | None:
            if logprobs is None:
                return None
            generated = completion_logprobs(choice.logprobs, len(choice.prefix))
            return join_logprobs(echoed(choice), generated) if body.echo else generated

        if not body.stream:
            await collect(loop, queue, choices, deadline)
            return {
                "id": response_id, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{
                    "index": c.index, "text": c.prefix + c.output,
                    "finish_reason": FINISH_REASONS.get(c.finish_reason, c.finish_reason),
                    "logprobs": choice_logprobs(c),
                } for c in choices],
                "usage": usage(lengths, choices),
            }

        def on_event(choice, delta, event):
            # With echo and logprobs the echoed prompt waits for its scores (the first event).
            opening = [chunk(choice, choice.prefix, None, echoed(choice))] \
                if body.echo and logprobs is not None and event.prompt_logprobs is not None else []
            part = None
            if event.logprob is not None:
                offset = len(choice.prefix) + len(choice.output) - len(delta)
                part = completion_logprobs(choice.logprobs[-1:], offset)
            finish = FINISH_REASONS.get(event.finish_reason)
            return opening + ([chunk(choice, delta, finish, part)] if delta or finish or part else [])

        def usage_chunk():
            return {"id": response_id, "object": "text_completion", "created": created,
                    "model": state.model_name, "choices": [], "usage": usage(lengths, choices)}

        opening = [chunk(c, c.prefix, None) for c in choices] if body.echo and logprobs is None else []
        stream = event_stream(loop, queue, choices, deadline, opening, on_event,
                              usage_chunk if body.include_usage else None)
        return StreamingResponse(stream, media_type="text/event-stream")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest):
        ready()
        check_max_tokens(body.max_tokens, "max_tokens")
        check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
        top = check_logprobs(body.top_logprobs, "top_logprobs")
        logprobs = (top or 0) if body.logprobs else None
        template = server.chat_template
        text = render_chat(body.messages, template)
        prompts = prompt_token_ids(text, state.tokenizer.encode, state.vocab_size)
        limit = body.max_completion_tokens or body.max_tokens
        if limit is None:  # the preset's default, clamped to the room the prompt leaves
            limit = max(1, min(defaults.max_new_tokens, state.max_model_len - len(prompts[0])))
        stops = body.stop_strings() + [s for s in template.stop if s]
        loop, response_id, requests, choices, deadline = prepare(body, prompts, limit, stops, logprobs)
        created, lengths = int(time.time()), [len(prompts[0])]
        queue = submit(loop, requests)

        def chat_logprobs(entries) -> dict:
            decode = state.tokenizer.decode
            content = []
            for token, logprob, alternatives in entries:
                text = decode([token])
                content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()),
                                "top_logprobs": [{"token": decode([t]), "logprob": p,
                                                  "bytes": list(decode([t]).encode())} for t, p in alternatives]})
            return {"content": content}

        if not body.stream:
            await collect(loop, queue, choices, deadline)
            return {
                "id": response_id, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": [{
                    "index": c.index, "message": {"role": "assistant", "content": c.output},
                    "finish_reason": FINISH_REASONS.get(c.finish_reason, c.finish_reason),
                    "logprobs": chat_logprobs(c.logprobs) if logprobs is not None else None,
                } for c in choices],
                "usage": usage(lengths, choices),
            }

        def chunk(choice, delta: dict, finish, logprobs_part=None) -> dict:
            return {"id": response_id, "object": "chat.completion.chunk", "created": created,
                    "model": state.model_name,
                    "choices": [{"index": choice.index, "delta": delta, "finish_reason": finish,
                                 "logprobs": logprobs_part}]}

        def on_event(choice, delta, event):
            part = chat_logprobs([choice.logprobs[-1]]) if event.logprob is not None else None
            finish = FINISH_REASONS.get(event.finish_reason)
            payloads = [chunk(choice, {"content": delta}, None, part)] if delta or part else []
            return payloads + ([chunk(choice, {}, finish)] if finish else [])

        def usage_chunk():
            return {"id": response_id, "object": "chat.completion.chunk", "created": created,
                    "model": state.model_name, "choices": [], "usage": usage(lengths, choices)}

        opening = [chunk(c, {"role": "assistant", "content": ""}, None) for c in choices]
        stream = event_stream(loop, queue, choices, deadline, opening, on_event,
                              usage_chunk if body.include_usage else None)
        return StreamingResponse(stream, media_type="text/event-stream")

    add_tokenizer_routes(app, state, ready, check_model, authorized)

    # ---- entailment --------------------------------------------------------------------------
    @app.post("/v1/entailment", dependencies=[Depends(authorized)])
    async def entailment(body: EntailmentPair | list[EntailmentPair]):
        loop = ready()
        single = isinstance(body, EntailmentPair)
        pairs = [body] if single else body
        if not pairs:
            raise bad_request("no premise/hypothesis pairs given")
        nli = state.entailment
        longest_label = max(len(ids) for ids in nli.label_ids)
        for i, pair in enumerate(pairs):
            where = "" if single else f"[{i}]."
            for name in ("premise", "hypothesis"):
                if not getattr(pair, name).strip():
                    raise bad_request(f"{where}{name} is empty", name)
            length = len(state.tokenizer.encode([nli.prompt(pair.premise, pair.hypothesis)])[0])
            if length + longest_label > state.max_model_len:
                raise bad_request(f"{where}premise + hypothesis take {length} prompt tokens; with the label that "
                                  f"is beyond the context of {state.max_model_len} tokens", "premise",
                                  "context_length_exceeded")
        try:
            results = await asyncio.wait_for(loop.entail([(p.premise, p.hypothesis) for p in pairs]),
                                             server.request_timeout)
        except TimeoutError:
            raise APIError(504, f"the request took longer than the timeout of {server.request_timeout:g} s",
                           code="timeout") from None
        except ValueError as err:  # e.g. a pair longer than the model's context
            raise bad_request(str(err)) from None
        return results[0] if single else results

    return app
