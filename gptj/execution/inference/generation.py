"""Offline generation: a fixed list of prompts run to completion through the request engine.

    results = generate(model, prompts, max_new_tokens=16, eos_token_id=tok.eos_id)

`generate` adds every prompt to a `RequestEngine` (gptj/execution/inference/request_engine.py,
the one decode loop: batched prefill, one-token decode steps, per-row stopping, continuous
batching) and steps it until every prompt is done. Pass a `ModelRunner` (runner=) to keep its
KV cache and compiled decode step from one call to the next; `GenerationEngine` is that pair,
a runner and the statistics of its last run. Up to `batch_size` prompts run together;
a finished row takes the next waiting prompt, prefilled into that row only, while the other
rows keep decoding. The KV cache is sized from the prompts and max_new_tokens (not the
model's context) and kept for the next run when it is large enough.

Sampling: prompt i draws from the random stream (seed, stream_ids[i]) (gptj/execution/inference/sampling.py),
the same stream a server request with that seed and stream id draws from, so a prompt's
samples do not depend on its batch, on the order rows are refilled or on the entry point.

Tensor parallel: every rank runs the same control flow on the same gathered logits and the
same random streams, so all ranks produce the same tokens; call `generate` on every rank with
the same arguments.

Results: `GenerationResult.token_ids` holds the generated tokens without the prompt and
WITHOUT the final EOS; a matched stop sequence IS included (the caller decides how to trim
text). `finish_reason` is "eos", "stop" or "length".
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gptj.execution.inference.generation_stats import GenerationStats
from gptj.execution.inference.model_runner import ModelRunner, sync
from gptj.execution.inference.request_engine import Request, RequestEngine, check_prompts
from gptj.execution.inference.sampling import SamplingParams

__all__ = ["GenerationEngine", "GenerationResult", "GenerationStats", "ModelRunner", "generate"]


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_length: int = 0
    # Seconds from the start of the run to this prompt's first token and to its end (a prompt
    # may wait in the queue while others run, so both include that wait).
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_sequences: Sequence[Sequence[int]] | None = None,
    batch_size: int | None = None,
    *,
    sampling: SamplingParams | None = None,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    on_finish: Callable[[int, GenerationResult], None] | None = None,
    stream_ids: Sequence[int] | None = None,
    runner: ModelRunner | None = None,
    stats: GenerationStats | None = None,
) -> list[GenerationResult]:
    """A continuation for each prompt (token ids), greedy by default; see the module docstring
    for the result contract.

    Returns one GenerationResult per prompt, in order. Under tensor parallelism every rank calls
    this with the same arguments and gets the same result. batch_size None: all prompts at once,
    at most 32 rows; longer lists are streamed through the batch (continuous batching).
    sampling: SamplingParams (replaces temperature / top_k / top_p). on_token(prompt_index, token)
    sees every kept token as it comes; on_finish(prompt_index, result) each prompt's result as
    soon as it is done. stream_ids: the random-stream id of each prompt (default: its index),
    so a prompt sampled alone can reproduce its samples from a larger run. runner: the
    ModelRunner whose cache and decode step to use (default: a new one over `model`). stats: a
    GenerationStats to fill with this run's figures.
    """
    with torch.inference_mode():
        return _generate(model, prompts, max_new_tokens, eos_token_id,
                         sampling or SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), seed,
                         stop_token_sequences, batch_size, stop_strings, decode, on_token, on_finish, stream_ids,
                         runner or ModelRunner(model), stats)


def _generate(model, prompts, max_new_tokens, eos_token_id, sampling, seed, stop_token_sequences, batch_size,
              stop_strings, decode, on_token, on_finish, stream_ids, runner, stats) -> list[GenerationResult]:
    stream_ids = list(range(len(prompts))) if stream_ids is None else list(stream_ids)
    if len(stream_ids) != len(prompts):
        raise ValueError(f"{len(stream_ids)} stream ids for {len(prompts)} prompts")
    prompts = [list(map(int, p)) for p in prompts]
    context = model.config.max_positions
    check_prompts(prompts, context, model.config.vocab_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (token ids -> text)")
    budgets = [min(max_new_tokens, context - len(p)) for p in prompts]
    if any(b < max_new_tokens for b in budgets):
        warnings.warn(
            f"max_new_tokens {max_new_tokens} exceeds the context of {context} tokens for "
            f"{sum(b < max_new_tokens for b in budgets)} prompt(s); generation stops at the context end",
            stacklevel=4,
        )
    start = time.perf_counter()
    engine = _engine_for(model, runner, prompts, budgets, batch_size, eos_token_id, decode)
    stops = [list(s) for s in (stop_token_sequences or []) if len(s)]
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        engine.add(Request(str(i), prompt, budget, sampling, seed, stream_ids[i], stops,
                           [s for s in (stop_strings or []) if s]))
    results = _drive(engine, prompts, start, on_token, on_finish)
    sync(runner.device)
    if stats is not None:
        vars(stats).update(vars(engine.stats))
        stats.total_seconds = time.perf_counter() - start
        stats.time_to_first_token = min(r.time_to_first_token for r in results)
    return results


def _engine_for(model, runner: ModelRunner, prompts: list[list[int]], budgets: list[int], batch_size: int | None,
                eos_token_id: int | None, decode) -> RequestEngine:
    """A request engine over `runner`, its cache sized for these prompts: the batch's rows, each
    as long as the longest prompt + its budget (rounded up to 256 for a compiled step, fewer
    distinct shapes, fewer recompilations)."""
    batch = max(1, min(batch_size or min(len(prompts), 32), len(prompts)))
    context = model.config.max_positions
    cache_length = max(len(p) + b for p, b in zip(prompts, budgets))
    if runner.compile_decode:
        cache_length = min(context, -(-cache_length // 256) * 256)
    cache = runner.cache
    if cache is not None and cache.batch_size == batch and cache.max_length >= cache_length:
        cache_length = cache.max_length  # keep the cache the runner has
    return RequestEngine(model, batch, eos_token_id, max_length=cache_length, decode=decode,
                         runner=runner, isolate_failures=False)


def _drive(engine: RequestEngine, prompts: list[list[int]], start: float, on_token, on_finish
           ) -> list[GenerationResult]:
    """Step `engine` until every prompt is done; each prompt's result, in order."""
    tokens: list[list[int]] = [[] for _ in prompts]
    first_at: list[float | None] = [None] * len(prompts)
    results: list[GenerationResult | None] = [None] * len(prompts)
    while engine.has_work:
        for event in engine.step():
            i = int(event.request_id)
            if first_at[i] is None:
                first_at[i] = event.time
            if event.token is not None:
                tokens[i].append(event.token)
                if on_token is not None:
                    on_token(i, event.token)
            if event.finish_reason is not None:
                result = GenerationResult(tokens[i], event.finish_reason, len(prompts[i]),
                                          first_at[i] - start, event.time - start)
                results[i] = result
                if on_finish is not None:
                    on_finish(i, result)
    return results  # type: ignore[return-value]


class GenerationEngine:
    """A model's ModelRunner (its KV cache and compiled decode step, kept between runs) and the
    statistics of its last `run`: `generate` with the same runner every call."""

    def __init__(self, model, compile_decode: bool = False, cache_dtype: torch.dtype | None = None):
        self.model = model
        self.runner = ModelRunner(model, compile_decode=compile_decode, cache_dtype=cache_dtype)
        self.stats = GenerationStats()

    @property
    def cache(self):
        return self.runner.cache

    @cache.setter
    def cache(self, cache) -> None:
        self.runner.cache = cache

    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int | None,
            sampling: SamplingParams | None = None, seed: int = 0, **options) -> list[GenerationResult]:
        """`generate` over this engine's runner (options: generate's keyword arguments); `stats`
        then describes this run."""
        stats = GenerationStats()
        results = generate(self.model, prompts, max_new_tokens, eos_token_id, sampling=sampling, seed=seed,
                           runner=self.runner, stats=stats, **options)
        self.stats = stats
        return results
