"""The generation engine: static KV cache, batched prefill, one-token decode steps,
per-row stopping and continuous batching.

How a batch runs:

1. Up to `batch_size` prompts are prefilled together (right-padded, each row's keys written
   into slots 0..L-1 of its own cache row, positions 0..L-1, so no row sees another's
   padding). The last real position of each row gives its first new token.
2. Decode steps feed one token per row at that row's own position; the cache mask
   [B,1,1,T] gains one visible slot per row per step, in place.
3. A row stops on EOS, on a stop sequence or when its budget (max_new_tokens, or the
   context) is used up. A stopped row is refilled with the next waiting prompt, prefilled
   into that row only; the other rows keep decoding undisturbed (continuous batching).

Only last-position hidden states go through the lm_head. Tensor parallel: every rank runs the
same control flow on the same gathered logits and the same random streams, so all ranks
produce the same tokens; call `generate` on every rank with the same arguments.

Results: `GenerationResult.token_ids` holds the generated tokens without the prompt and
WITHOUT the final EOS; a matched stop sequence IS included (the caller decides how to trim
text). `finish_reason` is "eos", "stop" or "length".
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gptj.kv_cache import StaticKVCache

from .sampling import SamplingParams, choose_tokens, prompt_generator


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_length: int = 0
    # Seconds from the start of the run to this prompt's first token and to its end (a prompt
    # may wait in the queue while others run, so both include that wait).
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0


@dataclass
class GenerationStats:
    """Wall-clock split of one `generate` call (seconds, synchronised with the device)."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    # Tokens are counted as the results hold them: a final EOS is not counted, a stop
    # sequence is. decode_tokens: those produced by decode steps (first tokens come from prefill).
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    # Cache slots each row's decode steps attended, summed over steps: the whole cache when the
    # step is compiled (static shapes), the filled part otherwise.
    attended_slots: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def mean_attended_slots(self) -> float:
        return self.attended_slots / self.decode_steps if self.decode_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_seconds if self.total_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "time_to_first_token_s": round(self.time_to_first_token, 6),
            "prefill_s": round(self.prefill_seconds, 6),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_second, 2),
            "decode_s": round(self.decode_seconds, 6),
            "decode_tokens_per_s": round(self.decode_tokens_per_second, 2),
            "total_s": round(self.total_seconds, 6),
            "tokens_per_s": round(self.tokens_per_second, 2),
        }


class _Row:
    """Host-side state of one batch row."""

    __slots__ = ("prompt", "tokens", "budget", "position", "generator", "first_token_at")

    def __init__(self):
        self.prompt = -1  # index of the prompt in this row, -1 = idle
        self.tokens: list[int] = []
        self.budget = 0
        self.position = 0  # slot the next fed token is written to
        self.generator = None
        self.first_token_at = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GenerationEngine:
    """Holds a model and a preallocated cache; `run` generates for a list of prompts.

    compile_decode: compile the decode step with torch.compile ("reduce-overhead" = CUDA
    graphs on GPU). Shapes then stay static: fixed batch, attention over the whole cache
    length with a mask instead of a growing slice; the cache's tensors are marked as static
    addresses, so the graph may write them in place. One compiled decode function serves every
    engine of a process: dynamo compiles it again for each new engine (its own model and
    cache), up to torch._dynamo.config.recompile_limit times (torch._dynamo.reset() starts over).
    cache_dtype: the KV cache's dtype (None: fp32 for bf16/fp16 models on CPU, else the model's;
    gptj/kv_cache.py).
    """

    def __init__(self, model, compile_decode: bool = False, cache_dtype: torch.dtype | None = None):
        self.model = model
        self.config = model.config
        self.device = model.embed.weight.device
        self.compile_decode = compile_decode
        self.cache_dtype = cache_dtype  # None: gptj.kv_cache.cache_dtype's choice
        self.cache: StaticKVCache | None = None
        self.stats = GenerationStats()
        self._decode_fn = self._decode_forward
        if compile_decode:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode_fn = torch.compile(self._decode_forward, mode=mode, dynamic=False)

    # ---- model calls -----------------------------------------------------------------------
    def _cache_for(self, batch_size: int, max_length: int) -> StaticKVCache:
        cache = self.cache
        if cache is None or cache.batch_size != batch_size or cache.max_length < max_length:
            self.cache = None  # free the old one first
            cache = self.cache = StaticKVCache.for_model(self.model, batch_size, max_length,
                                                                dtype=self.cache_dtype)
            if self.compile_decode:
                cache.mark_static_addresses()
        return cache

    def _prefill(self, cache: StaticKVCache, rows: list[int], prompts: list[list[int]],
                 pad_multiple: int = 1) -> torch.Tensor:
        """Write `prompts` into cache `rows`; return last-position logits [n, V] (fp32).

        pad_multiple: right-pad the batch to a multiple of this many tokens (fewer distinct
        shapes for kernels that cache per shape); padding is masked, so results are the same.
        """
        hidden, lengths = self._prefill_hidden(cache, rows, prompts, pad_multiple)
        last = hidden[torch.arange(len(rows), device=self.device), lengths - 1]
        return self.model.logits_from_hidden(last)

    def _prefill_hidden(self, cache: StaticKVCache, rows: list[int], prompts: list[list[int]],
                        pad_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `prompts` into cache `rows`; return the final hidden states of every position
        [n, S, d] (padding after each prompt's end) and the prompt lengths [n]."""
        device, n = self.device, len(rows)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        seq = max(len(p) for p in prompts)
        seq = min(cache.max_length, -(-seq // pad_multiple) * pad_multiple)
        ids = torch.zeros(n, seq, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(device)
        slots = torch.arange(seq, device=device)
        positions = slots.expand(n, seq)
        causal = slots[None, :] <= slots[:, None]  # [S, S]
        mask = (causal[None] & (slots[None, None, :] < lengths[:, None, None])).unsqueeze(1)
        all_rows = rows == list(range(cache.batch_size))
        cache.prefill(None if all_rows else torch.tensor(rows, device=device), lengths)
        hidden = self.model.hidden_states(ids, position_ids=positions, attn_mask=mask, kv_cache=cache)
        return hidden, lengths

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of one decode step, compiled or not. A CUDA-graph step's output is
        overwritten by the next replay: use it before the next call."""
        if self.compile_decode and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return self._decode_fn(tokens, positions, mask)

    def _decode_forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(
            tokens, position_ids=positions.unsqueeze(1), attn_mask=mask, kv_cache=self.cache
        )
        return self.model.logits_from_hidden(hidden[:, 0])

    # ---- the loop --------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_token_id: int | None,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        stop_token_sequences: Sequence[Sequence[int]] | None = None,
        batch_size: int | None = None,
        stop_strings: Sequence[str] | None = None,
        decode: Callable[[list[int]], str] | None = None,
        on_token: Callable[[int, int], None] | None = None,
        stream_ids: Sequence[int] | None = None,
        on_finish: Callable[[int, GenerationResult], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt; see the module docstring for the result contract.

        on_token(prompt_index, token) sees every kept token as it comes; on_finish(prompt_index,
        result) sees each prompt's result as soon as it is done (also one with no new token).

        stream_ids: the random-stream id of each prompt (default: its index in `prompts`), so a
        prompt sampled alone can reproduce its samples from a larger run.
        """
        sampling = sampling or SamplingParams()
        stream_ids = list(range(len(prompts))) if stream_ids is None else list(stream_ids)
        if len(stream_ids) != len(prompts):
            raise ValueError(f"{len(stream_ids)} stream ids for {len(prompts)} prompts")
        prompts = [list(map(int, p)) for p in prompts]
        context = self.config.max_positions
        _check_prompts(prompts, context, self.config.vocab_size)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_strings and decode is None:
            raise ValueError("stop_strings need a decode function (token ids -> text)")
        budgets = [min(max_new_tokens, context - len(p)) for p in prompts]
        if any(b < max_new_tokens for b in budgets):
            warnings.warn(
                f"max_new_tokens {max_new_tokens} exceeds the context of {context} tokens for "
                f"{sum(b < max_new_tokens for b in budgets)} prompt(s); generation stops at the context end",
                stacklevel=3,
            )
        stops = [list(s) for s in (stop_token_sequences or []) if len(s)]
        stop_strings = [s for s in (stop_strings or []) if s]
        tail_tokens = 2 * max((len(s) for s in stop_strings), default=0) + 4

        batch = max(1, min(batch_size or min(len(prompts), 32), len(prompts)))
        cache_length = max(len(p) + b for p, b in zip(prompts, budgets))
        if self.compile_decode:  # fewer distinct shapes, fewer recompilations
            cache_length = min(context, -(-cache_length // 256) * 256)
        cache = self._cache_for(batch, cache_length)
        static = self.compile_decode
        device = self.device

        stats = self.stats = GenerationStats()
        results: list[GenerationResult | None] = [None] * len(prompts)
        queue = deque(range(len(prompts)))
        rows = [_Row() for _ in range(batch)]
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        positions = torch.zeros(batch, dtype=torch.long, device=device)
        advance = torch.zeros(batch, dtype=torch.long, device=device)  # 1 on active rows
        idle_generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()

        def finish(b: int, reason: str) -> None:
            row = rows[b]
            result = GenerationResult(row.tokens, reason, len(prompts[row.prompt]),
                                      row.first_token_at - start, time.perf_counter() - start)
            results[row.prompt] = result
            if on_finish is not None:
                on_finish(row.prompt, result)
            row.prompt = -1

        def accept(b: int, token: int) -> bool:
            """Record row b's new token and stop the row if it is done; False for an EOS."""
            row = rows[b]
            if eos_token_id is not None and token == eos_token_id:
                finish(b, "eos")
                return False
            row.tokens.append(token)
            if on_token is not None:
                on_token(row.prompt, token)
            if any(row.tokens[-len(s):] == s for s in stops) or (
                stop_strings and any(s in decode(row.tokens[-tail_tokens:]) for s in stop_strings)
            ):
                finish(b, "stop")
            elif len(row.tokens) >= row.budget:
                finish(b, "length")
            return True

        def fill(free: list[int]) -> None:
            """Prefill waiting prompts into free rows until no free row can be filled."""
            while free and queue:
                take = free[: len(queue)]
                chosen = [queue.popleft() for _ in take]
                t0 = time.perf_counter()
                logits = self._prefill(cache, take, [prompts[i] for i in chosen])
                for b, i in zip(take, chosen):
                    row = rows[b]
                    row.prompt, row.tokens, row.budget = i, [], budgets[i]
                    row.position = len(prompts[i])
                    row.generator = None if sampling.greedy else prompt_generator(seed, stream_ids[i])
                first = choose_tokens(logits, sampling, [rows[b].generator for b in take])
                first_list = first.tolist()
                _sync(device)
                now = time.perf_counter()
                stats.prefill_seconds += now - t0
                stats.prompt_tokens += sum(len(prompts[i]) for i in chosen)
                if not stats.time_to_first_token:
                    stats.time_to_first_token = now - start
                take_index = torch.tensor(take, device=device)
                tokens[take_index, 0] = first
                positions[take_index] = torch.tensor([rows[b].position for b in take], device=device)
                free = free[len(take):]
                for b, token in zip(take, first_list):
                    rows[b].first_token_at = now
                    if accept(b, token):
                        stats.generated_tokens += 1
                    if rows[b].prompt < 0:
                        free.append(b)

        fill(list(range(batch)))
        advance.copy_(torch.tensor([int(row.prompt >= 0) for row in rows]))
        t_decode = time.perf_counter()
        while any(row.prompt >= 0 for row in rows):
            active = [row.prompt >= 0 for row in rows]
            window = cache.max_length if static else 1 + max(r.position for r, a in zip(rows, active) if a)
            cache.decode(positions, window)
            stats.attended_slots += window
            generators = [row.generator or idle_generator for row in rows]
            chosen = choose_tokens(self._decode_step(tokens, positions, cache.decode_mask_window()),
                                   sampling, generators)
            tokens.copy_(chosen.view(batch, 1))
            chosen_list = chosen.tolist()
            stats.decode_steps += 1
            freed = []
            for b, token in enumerate(chosen_list):
                if not active[b]:
                    continue
                rows[b].position += 1
                if accept(b, token):
                    stats.decode_tokens += 1
                    stats.generated_tokens += 1
                if rows[b].prompt < 0:
                    freed.append(b)
            positions.add_(advance)  # active rows move one slot on
            if freed:
                if queue:
                    t_fill = time.perf_counter()
                    fill(freed)
                    t_decode += time.perf_counter() - t_fill  # refill time counts as prefill
                # Idle rows stop moving and keep rewriting their last slot.
                advance.copy_(torch.tensor([int(row.prompt >= 0) for row in rows]))
        _sync(device)
        end = time.perf_counter()
        stats.decode_seconds = end - t_decode
        stats.total_seconds = end - start
        return results  # type: ignore[return-value]


def _check_prompts(prompts: list[list[int]], context: int, vocab_size: int) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: at least one token is needed")
        if len(p) >= context:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens but the model context is {context}: "
                "no room to generate (shorten it or truncate from the left)"
            )
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]} outside the vocabulary of {vocab_size}")


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_sequences: list[list[int]] | None = None,
    batch_size: int | None = None,
) -> list[GenerationResult]:
    """Generate a continuation for each prompt (token ids), greedy by default.

    Returns one GenerationResult per prompt, in order: `.token_ids` are the new tokens
    (EOS excluded, a matched stop sequence included), `.finish_reason` is "eos", "stop" or
    "length". Under tensor parallelism every rank calls this with the same arguments and gets
    the same result. batch_size None: all prompts at once, at most 32 rows; longer lists are
    streamed through the batch (continuous batching).
    """
    engine = GenerationEngine(model)
    return engine.run(
        prompts, max_new_tokens, eos_token_id,
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
        seed=seed, stop_token_sequences=stop_token_sequences, batch_size=batch_size,
    )
