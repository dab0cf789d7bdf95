"""The one thread that runs the engine: commands in, engine steps, events out.

HTTP handlers (on the asyncio event loop) never touch the model. They put commands in an
inbox (add a request, cancel one, score entailment pairs, load or unload a LoRA adapter:
serving/adapter_slots.py) and read their events from an
asyncio queue. The engine thread repeats:

    take every command in the inbox  ->  share them with the other tensor-parallel ranks
    ->  apply them (`apply_commands`)  ->  one engine step  ->  hand the events to the handlers

A request added between two steps joins the batch at the next step; a cancelled one leaves
its row at the next step. Every rank applies the same commands in the same order and runs
the same steps, so tensor-parallel ranks stay in lockstep: rank 0 sends each step's commands
(`StepSync`, one broadcast per step; an empty one every second while idle, so the others'
collectives never time out) and the other ranks run `follow`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import traceback

import torch.distributed as dist

from gptj.errors import GPTJError
from gptj.execution.inference.request_engine import Event, Request, RequestEngine
from gptj.model.parallel import ParallelContext, broadcast_json

from .adapter_slots import AdapterSlots

IDLE_HEARTBEAT_S = 1.0
REQUEST_LOG = logging.getLogger("gptj.requests")  # one line per finished request (serve() shows it)


class QueueFull(GPTJError):
    pass


class StepSync:
    """Rank 0's commands for each step, sent to every tensor-parallel rank (gloo control group)."""

    def __init__(self, ctx: ParallelContext | None = None):
        self.group = None
        if ctx is not None and ctx.tensor_parallel > 1:
            if ctx.replicas != 1:
                raise ValueError(f"the server runs one replica: launch exactly {ctx.tensor_parallel} processes "
                                 f"for --tensor-parallel {ctx.tensor_parallel} (found {ctx.world_size})")
            # Every rank creates the group; CPU tensors work next to NCCL too.
            self.group = dist.new_group(list(range(ctx.tensor_parallel)), backend="gloo")

    def share(self, message):
        return broadcast_json(message, self.group, src=0)


def apply_commands(engine: RequestEngine, entailment, commands: list,
                   adapters: AdapterSlots | None = None) -> tuple[list[Event], dict]:
    """Apply one step's commands on this rank: (events of refused adds, results by job:
    entailment scores, adapter loads and unloads)."""
    refused, jobs, changes = [], {}, {}
    for command in commands:
        kind = command[0]
        if kind == "add":
            request = Request.from_dict(command[1])
            try:
                engine.add(request)
            except ValueError as err:
                refused.append(Event(request.request_id, finish_reason="error", error=str(err), time=time.perf_counter()))
        elif kind == "cancel":
            engine.cancel(command[1])
        elif kind == "entail":
            jobs[command[1]] = command[2]
        elif kind == "load_adapter":
            changes[command[1]] = adapters.load(command[2], command[3])
        elif kind == "unload_adapter":
            refusal = adapters.unload(command[2], command[1])
            if refusal is not None:
                changes[command[1]] = refusal
    results = {}
    if jobs:  # every pending job in one batched pass
        pairs = [tuple(pair) for job in jobs.values() for pair in job]
        try:
            scored = entailment(pairs) if entailment is not None else RuntimeError("no entailment pipeline")
        except Exception as err:  # noqa: BLE001 - reported to the callers, the engine goes on
            scored = err
        start = 0
        for job_id, job in jobs.items():
            results[job_id] = scored if isinstance(scored, Exception) else scored[start : start + len(job)]
            start += len(job)
    if adapters is not None:
        changes.update(adapters.settle())
    return refused, {**results, **changes}


def follow(engine: RequestEngine, entailment, sync: StepSync, adapters: AdapterSlots | None = None) -> None:
    """Tensor-parallel ranks other than 0: run the steps rank 0 announces, until it says stop."""
    while True:
        message = sync.share(None)
        if message["stop"]:
            return
        apply_commands(engine, entailment, message["commands"], adapters)
        if engine.has_work:
            engine.step()
            if adapters is not None:
                adapters.settle()


class _Timing:
    __slots__ = ("arrival", "prompt_tokens", "first", "last", "tokens", "adapter")

    def __init__(self, arrival: float, prompt_tokens: int, adapter: str | None = None):
        self.arrival, self.prompt_tokens, self.adapter = arrival, prompt_tokens, adapter
        self.first = self.last = None
        self.tokens = 0


class EngineLoop:
    """Rank 0's engine thread and the thread-safe doors into it."""

    def __init__(self, engine: RequestEngine, metrics, max_queue: int, entailment=None,
                 sync: StepSync | None = None, adapters: AdapterSlots | None = None, model_name: str = "base"):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.model_name = model_name  # the base's name in the request log
        self.entailment, self.sync = entailment, sync or StepSync()
        self.adapters = adapters or AdapterSlots(engine)
        self._cond = threading.Condition()
        self._inbox: list = []
        self._queued_adds = 0
        self._free_rows = engine.max_batch_size
        self._engine_waiting = 0
        self._stopping = False
        self._timings: dict[str, _Timing] = {}
        self._sinks: dict[str, asyncio.Queue] = {}  # touched on the event loop only
        self._jobs: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # set if the loop itself died

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, aloop: asyncio.AbstractEventLoop) -> None:
        self._aloop = aloop
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished yet (read from any thread)."""
        return len(self._timings)

    # ---- called from the event loop ----------------------------------------------------------
    def submit(self, requests: list[Request]) -> asyncio.Queue:
        """Queue requests (all or none); their Events arrive on the returned asyncio queue."""
        now = time.perf_counter()
        with self._cond:
            waiting = self._queued_adds + self._engine_waiting
            if waiting + len(requests) > self.max_queue + self._free_rows:
                raise QueueFull(f"{waiting} requests are waiting (limit {self.max_queue})")
            queue = asyncio.Queue()
            for request in requests:
                self._sinks[request.request_id] = queue
                self._timings[request.request_id] = _Timing(now, len(request.prompt), request.adapter)
                self._inbox.append(("add", request.to_dict()))
            self._queued_adds += len(requests)
            self._free_rows = max(0, self._free_rows - len(requests))
            self._cond.notify()
        return queue

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(("cancel", request_id))
            self._cond.notify()

    def release(self, request_id: str) -> None:
        """The handler stopped listening: cancel the request unless it already finished."""
        if self._sinks.pop(request_id, None) is not None:
            self.cancel(request_id)

    async def entail(self, pairs: list[tuple[str, str]]) -> list[dict]:
        return await self._job("entail", [list(p) for p in pairs])

    async def load_adapter(self, name: str, path: str) -> dict:
        """Load a PEFT adapter directory under `name` between two steps; AdapterChangeError if refused."""
        return await self._job("load_adapter", name, path)

    async def unload_adapter(self, name: str) -> dict:
        """Unload adapter `name` once no request uses it; AdapterChangeError if it is not loaded."""
        return await self._job("unload_adapter", name)

    async def _job(self, kind: str, *args):
        """Run command (kind, job id, *args) on the engine thread; its result (raised if an error)."""
        future = asyncio.get_running_loop().create_future()
        job_id = f"job-{next(self._ids)}"
        self._jobs[job_id] = future
        with self._cond:
            self._inbox.append((kind, job_id, *args))
            self._cond.notify()
        try:
            return await future
        finally:
            self._jobs.pop(job_id, None)

    def _dispatch(self, events: list[Event], results: dict) -> None:
        for event in events:
            queue = self._sinks.get(event.request_id)
            if queue is not None:
                queue.put_nowait(event)
                if event.finish_reason is not None:
                    del self._sinks[event.request_id]
        for job_id, result in results.items():
            future = self._jobs.get(job_id)
            if future is None or future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not (self._inbox or self.engine.has_work or self._stopping):
                        self._cond.wait(IDLE_HEARTBEAT_S)
                    commands, self._inbox = self._inbox, []
                    stopping = self._stopping
                    self._queued_adds -= sum(c[0] == "add" for c in commands)
                message = self.sync.share({"commands": commands, "stop": stopping})
                if message["stop"]:
                    return
                events, results = apply_commands(self.engine, self.entailment, commands, self.adapters)
                if self.engine.has_work:
                    events += self.engine.step()
                    self.metrics.engine_steps.inc()
                    if self.engine.prefix_cache is not None:
                        self.metrics.record_prefix_cache(self.engine.prefix_cache)
                    results.update(self.adapters.settle())
                with self._cond:
                    self._engine_waiting = self.engine.num_waiting
                    self._free_rows = self.engine.max_batch_size - self.engine.num_running
                    self.metrics.running.set(self.engine.num_running)
                    self.metrics.waiting.set(self._engine_waiting + self._queued_adds)
                self._record(events)
                if events or results:
                    self._aloop.call_soon_threadsafe(self._dispatch, events, results)
        except Exception as err:  # the engine isolates request failures; this is a bug or a dead rank
            self.error = traceback.format_exc()
            # Requests in flight would otherwise wait for events that never come.
            now = time.perf_counter()
            failed = [Event(request_id, finish_reason="error", error=f"the engine stopped: {err!r}", time=now)
                      for request_id in list(self._timings)]
            self._aloop.call_soon_threadsafe(self._dispatch, failed, {})
            raise

    def _record(self, events: list[Event]) -> None:
        m = self.metrics
        for event in events:
            timing = self._timings.get(event.request_id)
            if timing is None:
                continue
            if event.token is not None:
                if timing.first is None:
                    timing.first = event.time
                    m.time_to_first_token.observe(event.time - timing.arrival)
                    m.prompt_tokens.inc(timing.prompt_tokens)
                timing.last = event.time
                timing.tokens += 1
                m.generation_tokens.inc()
                if timing.adapter is not None:
                    m.adapter_generation_tokens.labels(timing.adapter).inc()
            if event.finish_reason is not None:
                del self._timings[event.request_id]
                if timing.first is None and event.finish_reason in ("eos", "length"):  # "length": scored only
                    m.prompt_tokens.inc(timing.prompt_tokens)
                m.e2e_latency.observe(event.time - timing.arrival)
                if timing.tokens > 1:
                    m.time_per_output_token.observe((timing.last - timing.first) / (timing.tokens - 1))
                m.finished.labels(event.finish_reason).inc()
                if timing.adapter is not None:
                    m.adapter_requests.labels(timing.adapter).inc()
                if event.finish_reason == "cancelled":
                    m.cancelled.inc()
                REQUEST_LOG.info("request %s model %s: %d prompt + %d generated tokens, %s, %.3f s",
                                 event.request_id, timing.adapter or self.model_name, timing.prompt_tokens,
                                 timing.tokens, event.finish_reason, event.time - timing.arrival)
