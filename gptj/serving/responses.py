"""From engine events to a response: the choices, one JSON body or server-sent events.

A handler submits its engine requests (one per choice), then either waits for every choice
(`collect`) or streams `data: {...}` lines ending with `data: [DONE]` (`event_stream`). A
client that disconnects mid-stream, or a request past its deadline, is cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi.responses import StreamingResponse

from .engine_loop import EngineLoop, QueueFull
from .errors import APIError, error_body
from .state import ServerState
from .text import TextStream

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class Choice:
    """One choice of a response, built from its engine request's events."""

    def __init__(self, index: int, request_id: str, text: TextStream, prefix: str = ""):
        self.index, self.request_id, self.text, self.prefix = index, request_id, text, prefix
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list]] = []
        self.prompt_logprobs: list | None = None  # the prompt's scores (echo with logprobs)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.output = ""

    @property
    def finish(self) -> str | None:
        """The OpenAI finish reason."""
        return FINISH_REASONS.get(self.finish_reason, self.finish_reason)

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


def submit(loop: EngineLoop, requests) -> asyncio.Queue:
    try:
        return loop.submit(requests)
    except QueueFull as err:
        raise APIError(429, f"the server is busy: {err}; retry later", code="queue_full",
                       headers={"Retry-After": "1"}) from None


async def events_of(loop, queue, choices, deadline):
    """(choice, delta, event) as tokens come; cancels unfinished choices when the consumer leaves."""
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


async def collect(state: ServerState, loop, queue, choices, deadline) -> None:
    """Wait until every choice finished; cancel them all on timeout or error."""
    try:
        async for _ in events_of(loop, queue, choices, deadline):
            pass
    except TimeoutError:
        raise state.timeout_error() from None
    failed = [c for c in choices if c.finish_reason == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0].error}", code="generation_failed")


def sse(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def known_stream(payloads: list) -> StreamingResponse:
    """Server-sent events of chunks all known at once (a guided choice's): each, then [DONE]."""
    async def events():
        for payload in payloads:
            yield sse(payload)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def usage(prompt_lengths, choices) -> dict:
    prompt = sum(prompt_lengths)
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def event_stream(state: ServerState, loop, queue, choices, deadline, opening, on_event, usage_chunk):
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
        yield sse(state.timeout_error().body())
    yield "data: [DONE]\n\n"
