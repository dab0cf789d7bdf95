"""Continuous batching driven one step at a time: the engine behind the HTTP server.

This is the one decode loop: the server drives it request by request, and
`generate` (gptj/execution/inference/generation.py) drives it over a fixed list of prompts, so
stopping (EOS, stop sequences, stop strings, length) and sampling live here alone. The model
calls and the static KV cache are a `ModelRunner`'s (gptj/execution/inference/model_runner.py). Three calls:

    add(request)     queue a request; it joins the batch at the next step
    cancel(id)       drop a request, queued or running; its row is free at the next step
    step()           admit queued requests into free rows (one batched prefill), then one
                     decode step for every running row; returns what happened as `Event`s

A request's tokens do not depend on what else is in the batch: each row chooses its token
from its own logits with its own sampling settings and its own random stream (seeded from
(seed, stream_id), gptj/execution/inference/sampling.py), so a request run among others gives the tokens it
gives alone. Rows that share a sampling setting are chosen in one call (one batched max for
greedy rows); each still draws one uniform per vocabulary entry per token from its own stream.
Every step adds to `stats` (a GenerationStats: prefill and decode time, tokens, attended slots).

A failure while handling one request (a prefill that raises, a stop-string check that
raises) finishes that request with reason "error"; the other requests go on. A failing
decode step fails the requests in it and leaves the engine ready for new ones.

Prefix caching (on with a cache budget, the server's; gptj/execution/inference/prefix_cache.py):
the KV of every full block of a prefilled prompt is kept, keyed by its prefix and adapter; a
later prompt that starts with held blocks gets them copied into its row and prefills only the
rest. A request admitted beside an earlier one that shares a longer prefix than the cache
holds waits for a second prefill pass in the same step, after the first has stored its blocks.
Requests asking for prompt log-probabilities need every prompt position's hidden state, so
they prefill in full (and still store their blocks).

Tensor parallel: every rank must make the same calls in the same order (same requests, same
seeds); every rank then computes the same tokens, and holds the same prefix blocks, each with
its own heads.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from gptj.errors import UsageError
from gptj.execution.inference.generation_stats import GenerationStats
from gptj.execution.inference.kv_budget import CacheBudget
from gptj.execution.inference.model_runner import ModelRunner, sync
from gptj.execution.inference.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache
from gptj.execution.inference.requests import MAX_LOGPROBS, Event, Request  # noqa: F401 (the engine's API)
from gptj.execution.inference.sampling import SamplingParams, choose_tokens, prompt_generator
from gptj.execution.inference.scoring import PrefixReuse, token_logprobs


class _Slot:
    """Host-side state of one batch row."""

    __slots__ = ("request", "tokens", "position", "generator", "next_token", "tail_tokens")

    def __init__(self):
        self.request: Request | None = None
        self.tokens: list[int] = []
        self.position = 0  # cache slot the next fed token is written to
        self.generator: torch.Generator | None = None
        self.next_token = 0
        self.tail_tokens = 0


class RequestEngine:
    """Continuous batching over requests added between steps.

    max_batch_size rows of KV cache, each `max_length` tokens long (default: the model's
    context); a request needs len(prompt) + max_new_tokens <= max_length.
    decode: token ids -> text, needed by requests with stop strings.
    prefill_multiple: prefill batches are right-padded to a multiple of this many tokens (the
    padding is masked). CPU bf16 kernels keep a compiled kernel per matmul shape; with prompts
    of every length a server's memory grows for minutes, with lengths in steps of 16 it is flat.
    prefill_token_budget: the most tokens (rows x padded length) one prefill forward takes;
    a step that admits more prefills them in groups (a class default; set it per engine).
    adapters: a gptj.model.multi_lora.MultiLoRA attached to the model; each request's `adapter`
    names one, and every forward is told which adapter each batch row uses.
    runner: the ModelRunner to use (its cache, compiled step and cache dtype); None: a new one
    from compile_decode and cache_dtype.
    cache_budget: an gptj.execution.inference.kv_budget.CacheBudget: the cache starts small and grows as rows
    fill and requests need longer rows, never beyond the budget's bytes (a request that does
    not fit yet waits for running ones to finish). None: all rows at full length up front.
    isolate_failures: a failing request finishes with reason "error" while the others go on
    (a server); False: the error is raised (one offline run).
    prefix_cache: reuse the KV of prompt blocks across requests (module docstring). None: on
    when there is a cache budget or the runner already holds a PrefixCache; True: on (a new
    PrefixCache of `prefix_block_size`-token blocks on the runner when it has none); False: off.
    The blocks held take at most the budget's bytes less the row cache's; without a budget, the
    PrefixCache's max_bytes, or as many bytes as the row cache when that is None.
    """

    prefill_token_budget = 16384

    def __init__(
        self,
        model,
        max_batch_size: int,
        eos_token_id: int | None,
        max_length: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
        compile_decode: bool = False,
        prefill_multiple: int = 1,
        cache_dtype: torch.dtype | None = None,
        adapters=None,
        runner: ModelRunner | None = None,
        cache_budget: CacheBudget | None = None,
        isolate_failures: bool = True,
        prefix_cache: bool | None = None,
        prefix_block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        if max_batch_size < 1:
            raise UsageError(f"max_batch_size must be >= 1, got {max_batch_size}")
        context = model.config.max_positions
        self.max_length = context if max_length is None else max_length
        if not 1 < self.max_length <= context:
            raise UsageError(f"max_length must be in [2, {context}] (the model context), got {self.max_length}")
        self.model, self.eos_token_id, self.decode = model, eos_token_id, decode
        if prefill_multiple < 1:
            raise UsageError(f"prefill_multiple must be >= 1, got {prefill_multiple}")
        self.prefill_multiple = prefill_multiple
        self.vocab_size = model.config.vocab_size
        self.runner = runner or ModelRunner(model, compile_decode=compile_decode, cache_dtype=cache_dtype)
        if adapters is not None and self.runner.compile_decode:
            raise UsageError("a compiled decode step does not take per-request LoRA adapters: drop --compile")
        self.adapters = adapters
        self.isolate_failures = isolate_failures
        self.budget = cache_budget
        self._budget_bytes = None if cache_budget is None else cache_budget.budget_bytes
        if cache_budget is not None and self.runner.compile_decode:
            # A compiled step needs static shapes: the rows that fit at full length, once.
            max_batch_size = min(max_batch_size, cache_budget.full_rows(self.max_length))
            self.budget = None
        rows, length = (max_batch_size, self.max_length) if self.budget is None else self.budget.first_shape()
        self.cache = self.runner.cache_for(rows, length)
        if prefix_cache is None:
            prefix_cache = cache_budget is not None or self.runner.prefix_cache is not None
        if prefix_cache and self.runner.prefix_cache is None:
            self.runner.prefix_cache = PrefixCache(prefix_block_size)
        self.prefix_cache: PrefixCache | None = self.runner.prefix_cache if prefix_cache else None
        self._reused: dict[str, int] = {}  # request id -> prompt tokens taken from the prefix cache
        self._views: dict[int, object] = {}  # leading-rows views of the cache, by row count
        self.slots = [_Slot() for _ in range(max_batch_size)]
        self.waiting: deque[Request] = deque()
        self._pending: list[Event] = []  # cancellations of queued requests, reported by the next step
        self.steps = 0
        self.stats = GenerationStats()

    # ---- state -------------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return len(self.slots)

    @property
    def num_running(self) -> int:
        return sum(slot.request is not None for slot in self.slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self._pending or self.num_running)

    def check(self, request: Request) -> None:
        """Raise ValueError naming what is wrong with `request`."""
        scoring_only = request.max_new_tokens == 0 and request.prompt_logprobs is not None
        if request.max_new_tokens < (0 if scoring_only else 1):
            raise UsageError(f"max_new_tokens must be >= 1 (0 only to score the prompt), got {request.max_new_tokens}")
        total = len(request.prompt) + request.max_new_tokens
        if total > self.max_length:
            raise UsageError(
                f"the prompt has {len(request.prompt)} tokens and max_new_tokens is {request.max_new_tokens} "
                f"({total} in total) but the context is {self.max_length} tokens"
            )
        # Emptiness and token ids; the length is checked above (a prompt that only scores
        # may fill its row, it needs no room to generate).
        check_prompts([request.prompt], self.max_length + 1, self.vocab_size)
        if request.stop_strings and self.decode is None:
            raise UsageError("stop strings need a decode function (token ids -> text)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(request, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise UsageError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        loaded = self.adapters.names if self.adapters is not None else []
        if request.adapter is not None and request.adapter not in loaded:
            raise UsageError(f"adapter {request.adapter!r} is not loaded (loaded: {', '.join(loaded) or 'none'})")

    # ---- the three calls ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.check(request)
        self.waiting.append(request)

    def cancel(self, request_id: str) -> bool:
        """Drop a queued or running request; False when it is not here (e.g. already done)."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                self._pending.append(Event(request_id, finish_reason="cancelled", time=time.perf_counter()))
                return True
        for slot in self.slots:
            if slot.request is not None and slot.request.request_id == request_id:
                self._free(slot)
                self._pending.append(Event(request_id, finish_reason="cancelled", time=time.perf_counter()))
                return True
        return False

    @torch.inference_mode()
    def step(self) -> list[Event]:
        events, self._pending = self._pending, []
        free = [b for b, slot in enumerate(self.slots) if slot.request is None]
        try:
            if free and self.waiting:
                self._admit(free, events)
            if any(slot.request is not None for slot in self.slots):
                self._decode(events)
        finally:
            if self.adapters is not None:  # other users of the model (entailment) get the base
                self.adapters.set_rows(None)
        self.steps += 1
        return events

    # ---- admission: batched prefill ----------------------------------------------------------
    def _admit(self, free: list[int], events: list[Event]) -> None:
        rows = self._rows_that_fit(free[: len(self.waiting)])
        if not rows:
            return
        requests = [self.waiting.popleft() for _ in rows]
        t0 = time.perf_counter()
        try:
            logits, scores = self._prefill(rows, requests)
        except Exception:  # noqa: BLE001
            if not self.isolate_failures:
                raise
            # Find the failing request by prefilling one at a time; the others still run.
            for row, request in zip(rows, requests):
                try:
                    logits, scores = self._prefill([row], [request])
                except Exception as err:  # noqa: BLE001 - one bad request must not stop the engine
                    self._reused.pop(request.request_id, None)
                    events.append(_failed(request, f"prefill failed: {err}"))
                    continue
                self._start([row], [request], logits, scores, events)
        else:
            self._start(rows, requests, logits, scores, events)
        sync(self.runner.device)
        stats = self.stats
        stats.prefill_seconds += time.perf_counter() - t0
        stats.prompt_tokens += sum(len(r.prompt) for r in requests)

    def _rows_that_fit(self, rows: list[int]) -> list[int]:
        """The leading part of `rows` whose waiting requests the cache can hold, the cache
        grown (within its budget) to hold them; all of them when the cache is fixed."""
        if self.budget is None:
            return rows
        running = [(b, s.request) for b, s in enumerate(self.slots) if s.request is not None]
        in_use = 1 + max((b for b, _ in running), default=-1)
        length = max((len(r.prompt) + r.max_new_tokens for _, r in running), default=0)
        shape, taken = None, 0
        for row, request in zip(rows, self.waiting):
            wanted = self.budget.shape_for(max(in_use, row + 1), max(length, len(request.prompt) + request.max_new_tokens),
                                           (self.cache.batch_size, self.cache.max_length))
            if wanted is None:
                break
            shape, taken = wanted, taken + 1
            in_use, length = max(in_use, row + 1), max(length, len(request.prompt) + request.max_new_tokens)
        if shape is not None and shape != (self.cache.batch_size, self.cache.max_length):
            if self.prefix_cache is not None:  # the rows come first: blocks make room before the copy
                self.prefix_cache.shrink_to(self._budget_bytes - self.budget.nbytes(*shape))
            self.cache.resize(*shape)
            self._views.clear()  # they hold the old tensors
        return rows[:taken]

    def _prefill(self, rows: list[int], requests: list[Request]) -> tuple[torch.Tensor, list]:
        """Prefill `requests` into cache `rows`: last-position logits [n, V] and each request's
        prompt scores (`Event.prompt_logprobs`; None unless it asked).

        With a prefix cache, each request's held leading blocks are copied into its row first and
        only the rest of its prompt runs; a request that shares more blocks with an earlier one
        of this batch than the cache holds runs in a later pass, once those blocks are stored."""
        pool, n = self.prefix_cache, len(requests)
        if pool is None:
            return self._prefill_groups(rows, requests, [0] * n)
        keys = [pool.block_keys(r.prompt, r.adapter) for r in requests]
        logits: list = [None] * n
        scores: list = [None] * n
        for now in pool.passes(keys, [_looks_up(r) for r in requests]):
            starts = {i: self._copy_held_blocks(rows[i], requests[i], keys[i]) for i in now}
            for part in ([i for i in now if not starts[i]], [i for i in now if starts[i]]):
                if part:
                    part_logits, part_scores = self._prefill_groups(
                        [rows[i] for i in part], [requests[i] for i in part], [starts[i] for i in part],
                        keys=[keys[i] for i in part])
                    for j, i in enumerate(part):
                        logits[i], scores[i] = part_logits[j], part_scores[j]
        return torch.stack(logits), scores

    def _copy_held_blocks(self, row: int, request: Request, keys: list[bytes]) -> int:
        """Copy the held leading blocks of `request`'s prompt into `row`; the number of prompt
        tokens they cover that need no prefill (the last prompt token is always run: its logits
        choose the first token)."""
        pool = self.prefix_cache
        if not _looks_up(request):
            start = 0
        else:
            blocks = pool.take(keys)
            start = min(len(blocks) * pool.block_size, len(request.prompt) - 1)
            if start:
                self.cache.write_blocks(row, blocks)
        self._reused[request.request_id] = start
        return start

    def _prefill_groups(self, rows: list[int], requests: list[Request], starts: list[int],
                        keys: list | None = None) -> tuple[torch.Tensor, list]:
        """`requests` (after `starts` tokens each) in groups of consecutive requests whose padded
        batch holds at most `prefill_token_budget` tokens (a longer prompt alone), so many long
        prompts (a scoring client's batch) never hold all their activations at once. Each
        group's full prompt blocks are stored in the prefix cache (`keys`: their keys)."""
        groups, group, longest = [], [], 0
        for i, request in enumerate(requests):
            fed = len(request.prompt) - starts[i]
            width = -(-max(longest, fed) // self.prefill_multiple) * self.prefill_multiple
            if group and (len(group) + 1) * width > self.prefill_token_budget:
                groups.append(group)
                group, longest = [], 0
            group.append(i)
            longest = max(longest, fed)
        groups.append(group)
        logits, scores = [], []
        for group in groups:
            part_logits, part_scores = self._prefill_group([rows[i] for i in group], [requests[i] for i in group],
                                                           [starts[i] for i in group])
            logits.append(part_logits)
            scores += part_scores
            if keys is not None:
                for i in group:
                    self._store_blocks(rows[i], requests[i], keys[i])
        return torch.cat(logits), scores

    def _store_blocks(self, row: int, request: Request, keys: list[bytes]) -> None:
        size = self.prefix_cache.block_size
        self.prefix_cache.store(keys, request.adapter, lambda j: self.cache.read_block(row, j * size, size),
                                self.prefix_store_limit())

    def prefix_store_limit(self) -> int | None:
        """The bytes the prefix cache may hold now: the KV budget less the row cache; without a
        budget, as much as the row cache (unless the pool has a ceiling of its own)."""
        if self._budget_bytes is not None:
            return self._budget_bytes - self.cache.nbytes()
        return self.cache.nbytes() if self.prefix_cache.max_bytes is None else None

    def prefix_reuse(self, adapter: str | None = None) -> PrefixReuse | None:
        """How candidate scoring on the engine's thread (the server's /v1/classify and guided
        choices) shares this engine's prefix cache: the same pool, KV dtype and store limit as
        its own prompts. None when prefix caching is off."""
        if self.prefix_cache is None:
            return None
        return PrefixReuse(self.prefix_cache, adapter, self.cache.layers[0].keys.dtype, self.prefix_store_limit)

    def _prefill_group(self, rows: list[int], requests: list[Request], starts: list[int]) -> tuple[torch.Tensor, list]:
        """One batched prefill; its prompt scores in one `gptj.execution.inference.scoring.token_logprobs` pass
        over the prefill's hidden states (requests after a cached prefix ask for none)."""
        self._set_adapter_rows([r.adapter for r in requests])
        prompts = [r.prompt for r in requests]
        if any(starts):
            hidden, lengths = self.runner.prefill(self.cache, rows, prompts, self.prefill_multiple, starts=starts)
        else:
            hidden, lengths = self.runner.prefill(self.cache, rows, prompts, self.prefill_multiple)
        device = hidden.device
        logits = self.model.logits_from_hidden(hidden[torch.arange(len(rows), device=device), lengths - 1])
        scored = [i for i, r in enumerate(requests) if r.prompt_logprobs is not None and len(r.prompt) > 1]
        scores: list = [[] if r.prompt_logprobs is not None else None for r in requests]
        if scored:
            # Position t predicts prompt token t + 1; every scored request asks for its own top-N.
            batch = torch.tensor([i for i in scored for _ in requests[i].prompt[1:]], device=device)
            position = torch.tensor([t for i in scored for t in range(len(requests[i].prompt) - 1)], device=device)
            targets = torch.tensor([t for i in scored for t in requests[i].prompt[1:]], device=device)
            top_k = max(requests[i].prompt_logprobs for i in scored)
            entries = token_logprobs(self.model, hidden[batch, position], targets, top_k).entries()
            start = 0
            for i in scored:
                n, k = len(requests[i].prompt) - 1, requests[i].prompt_logprobs
                scores[i] = [(value, top[:k]) for value, top in entries[start:start + n]]
                start += n
        return logits, scores

    def _start(self, rows: list[int], requests: list[Request], logits: torch.Tensor, scores: list,
               events: list[Event]) -> None:
        """Rows begin their requests with the first token chosen from the prefill's logits; a
        request that only scores its prompt is done at once and leaves its row free."""
        generating = []
        pool = self.prefix_cache
        for i, (row, request) in enumerate(zip(rows, requests)):
            reused = self._reused.pop(request.request_id, 0)
            if pool is not None:
                pool.prompt_tokens += len(request.prompt)
                pool.hit_tokens += reused
            if request.max_new_tokens == 0:
                events.append(Event(request.request_id, finish_reason="length", time=time.perf_counter(),
                                    prompt_logprobs=scores[i]))
                continue
            slot = self.slots[row]
            slot.request, slot.tokens, slot.position = request, [], len(request.prompt)
            sampling = request.sampling
            slot.generator = None if sampling.greedy else prompt_generator(request.seed, request.stream_id)
            slot.tail_tokens = 2 * max((len(s) for s in request.stop_strings), default=0) + 4
            generating.append(i)
        if not generating:
            return
        first = self._choose_and_accept([self.slots[rows[i]] for i in generating],
                                        _rows_of(logits, generating), events)
        for i, event in zip(generating, first):
            event.prompt_logprobs = scores[i]
        self.stats.generated_tokens += sum(event.token is not None for event in first)

    # ---- one decode step ---------------------------------------------------------------------
    def _decode(self, events: list[Event]) -> None:
        """One token for every running row.

        Rows are filled lowest first, so running rows gather at the front: the step runs over
        rows 0..last running row only (all rows when the decode step is compiled, for static
        shapes). Idle rows in that range feed token 0 at slot 0: harmless (a new request
        prefills its row afresh) and it keeps a visible slot in every row's mask.
        """
        t0 = time.perf_counter()
        device = self.runner.device
        active = [slot.request is not None for slot in self.slots]
        static = self.runner.compile_decode
        rows = len(active) if static else 1 + max(b for b, a in enumerate(active) if a)
        window = 1 + max(s.position for s, a in zip(self.slots, active) if a)
        if static:
            window = self.cache.max_length
        slots = self.slots[:rows]
        tokens = torch.tensor([[s.next_token if a else 0] for s, a in zip(slots, active)], device=device)
        positions = torch.tensor([s.position if a else 0 for s, a in zip(slots, active)], device=device)
        self._set_adapter_rows([s.request.adapter if a else None for s, a in zip(slots, active)])
        try:
            cache = self.cache if static else (self._views.get(rows)
                                               or self._views.setdefault(rows, self.cache.leading_rows(rows)))
            logits = self.runner.decode(cache, tokens, positions, window)
        except Exception as err:  # noqa: BLE001 - fail the requests in this step, keep serving
            if not self.isolate_failures:
                raise
            for slot in self.slots:
                if slot.request is not None:
                    events.append(_failed(slot.request, f"decode step failed: {err}"))
                    self._free(slot)
            return
        running = [b for b in range(rows) if active[b]]
        for b in running:
            slots[b].position += 1
        chosen = self._choose_and_accept([slots[b] for b in running], _rows_of(logits, running), events)
        kept = sum(event.token is not None for event in chosen)
        stats = self.stats
        stats.decode_steps += 1
        stats.attended_slots += window
        stats.decode_tokens += kept
        stats.generated_tokens += kept
        stats.decode_seconds += time.perf_counter() - t0

    # ---- per row -----------------------------------------------------------------------------
    def _choose_and_accept(self, slots: list[_Slot], logits: torch.Tensor, events: list[Event]) -> list[Event]:
        """Pick each slot's next token from its row of `logits` [n, V] and record it: one event
        per slot, returned in slot order. An error fails its row only."""
        chosen = self._choose(slots, logits)
        out = []
        for i, (slot, token) in enumerate(zip(slots, chosen)):
            request = slot.request
            try:
                if isinstance(token, Exception):
                    raise token
                event = self._accept(slot, token, logits[i])
            except Exception as err:  # noqa: BLE001 - one bad request must not stop the engine
                if not self.isolate_failures:
                    raise
                event = _failed(request, str(err) or type(err).__name__)
            events.append(event)
            out.append(event)
            if event.finish_reason is not None:
                self._free(slot)
        return out

    def _choose(self, slots: list[_Slot], logits: torch.Tensor) -> list:
        """Each slot's next token (or the error choosing it): one `choose_tokens` call per
        distinct sampling setting, so rows that share one (all greedy rows) are chosen together.
        Each row draws from its own random stream, so its token does not depend on the batch."""
        by_setting: dict[SamplingParams, list[int]] = {}
        for i, slot in enumerate(slots):
            by_setting.setdefault(slot.request.sampling, []).append(i)
        chosen: list = [None] * len(slots)
        for sampling, rows in by_setting.items():
            try:
                generators = None if sampling.greedy else [slots[i].generator for i in rows]
                tokens = choose_tokens(_rows_of(logits, rows), sampling, generators).tolist()
            except Exception as err:  # noqa: BLE001 - failed below, row by row
                tokens = [err] * len(rows)
            for i, token in zip(rows, tokens):
                chosen[i] = token
        return chosen

    def _accept(self, slot: _Slot, token: int, logits: torch.Tensor) -> Event:
        """The event of the slot's new token, logits [V]: its log-probabilities when asked for,
        and the finish reason when it ends the request."""
        request = slot.request
        event = Event(request.request_id, time=time.perf_counter())
        if request.logprobs is not None:
            logp = logits.float().log_softmax(-1)
            event.logprob = float(logp[token])
            if request.logprobs:
                top = torch.topk(logp, min(request.logprobs, logp.shape[-1]))
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        if token == self.eos_token_id and not request.ignore_eos:
            event.logprob = event.top_logprobs = None
            event.finish_reason = "eos"
        else:
            slot.tokens.append(token)
            slot.next_token = token
            event.token = token
            event.finish_reason = self._stop_reason(slot)
        return event

    def _stop_reason(self, slot: _Slot) -> str | None:
        request, tokens = slot.request, slot.tokens
        if any(tokens[-len(s):] == s for s in request.stop_token_sequences if s):
            return "stop"
        if request.stop_strings:
            tail = self.decode(tokens[-slot.tail_tokens:])
            if any(s in tail for s in request.stop_strings):
                return "stop"
        if len(tokens) >= request.max_new_tokens:
            return "length"
        return None

    # ---- adapters added and removed between steps (on the thread that steps) ----------------
    def adapter_in_use(self, name: str) -> bool:
        """Whether a queued or running request uses adapter `name`."""
        running = (slot.request for slot in self.slots if slot.request is not None)
        return any(r.adapter == name for r in (*self.waiting, *running))

    def add_adapter(self, name: str, lora) -> None:
        """Serve `lora` (a gptj.model.lora.LoraAdapters for this model) under `name` from the next step."""
        if self.adapters is None:
            raise UsageError("this engine was built without adapters (adapters=None)")
        self.adapters.add(name, lora)
        if self.prefix_cache is not None:  # blocks of an earlier adapter of that name are stale
            self.prefix_cache.drop_adapter(name)

    def remove_adapter(self, name: str) -> None:
        if self.adapter_in_use(name):
            raise UsageError(f"adapter {name!r} still has requests")
        self.adapters.remove(name)
        if self.prefix_cache is not None:
            self.prefix_cache.drop_adapter(name)

    def _set_adapter_rows(self, names: list[str | None]) -> None:
        if self.adapters is not None:
            self.adapters.set_rows([self.adapters.index(name) for name in names])

    def _free(self, slot: _Slot) -> None:
        slot.request, slot.generator, slot.tokens = None, None, []


def _rows_of(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows], without a copy when `rows` are all of them in order."""
    if rows == list(range(logits.shape[0])):
        return logits
    return logits[torch.tensor(rows, device=logits.device)]


def _looks_up(request: Request) -> bool:
    """Whether a request may start from cached prompt blocks: not when it asks for every prompt
    position's scores (those positions must run)."""
    return request.prompt_logprobs is None and len(request.prompt) > 1


def _failed(request: Request, message: str) -> Event:
    return Event(request.request_id, finish_reason="error", error=message, time=time.perf_counter())


def check_prompts(prompts: list[list[int]], context: int, vocab_size: int) -> None:
    """Raise ValueError naming the first prompt that is empty, leaves no room below `context`
    or holds a token outside the vocabulary."""
    if not prompts:
        raise UsageError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"prompt {i} is empty: at least one token is needed")
        if len(p) >= context:
            raise UsageError(
                f"prompt {i} has {len(p)} tokens but the model context is {context}: "
                "no room to generate (shorten it or truncate from the left)"
            )
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(f"prompt {i} holds token id {bad[0]} outside the vocabulary of {vocab_size}")
