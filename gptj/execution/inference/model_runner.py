"""The model calls of generation: a static KV cache, batched prefill, one-token decode steps.

    runner = ModelRunner(model)
    hidden, lengths = runner.prefill(cache, rows, prompts)      # prompts into cache rows
    hidden, lengths = runner.prefill(cache, rows, prompts, starts=starts)  # after cached prefixes
    logits = runner.decode(cache, tokens, positions, window)    # one token per row

The request engine (request_engine.py) is the one caller that schedules them; offline
generation (generation.py) and the server drive that engine.

Prefill: prompts are right-padded into one batch, each row's keys written into slots
0..L-1 of its own cache row at positions 0..L-1, so no row sees another's padding. With
`starts` (a prefix cache's hit: slots 0..starts[i]-1 of row i already hold the prompt's first
tokens, gptj/execution/inference/prefix_cache.py) only the rest is fed, at positions and slots
starts[i].., attending to the cached slots and to itself.
Decode: one token per row at that row's own position; the cache mask [B,1,1,T] gains one
visible slot per row per step, in place. Only last-position hidden states go through the
lm_head.

compile_decode: the decode step is compiled with torch.compile ("reduce-overhead" = CUDA
graphs on GPU). Shapes then stay static: fixed batch, attention over the whole cache length
with a mask instead of a growing slice; the cache's tensors are marked as static addresses,
so the graph may write them in place. One compiled decode function serves every runner of a
process: dynamo compiles it again for each new runner (its own model and cache), up to
torch._dynamo.config.recompile_limit times (torch._dynamo.reset() starts over).
cache_dtype: the KV cache's dtype (None: fp32 for bf16/fp16 models on CPU, else the model's;
gptj/model/kv_cache.py).
"""

from __future__ import annotations

import torch

from gptj.execution.inference.prefix_cache import PrefixCache
from gptj.model.kv_cache import StaticKVCache


def sync(device: torch.device) -> None:
    """Wait for the device, so a wall-clock reading covers the work queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModelRunner:
    def __init__(self, model, compile_decode: bool = False, cache_dtype: torch.dtype | None = None,
                 prefix_cache: PrefixCache | None = None):
        self.model = model
        # Prompt blocks' KV kept across requests (and across engines over this runner); the
        # request engine looks prompts up in it and fills it.
        self.prefix_cache = prefix_cache
        self.config = model.config
        self.device = model.device
        self.compile_decode = compile_decode
        self.cache_dtype = cache_dtype  # None: gptj.model.kv_cache.cache_dtype's choice
        self.cache: StaticKVCache | None = None
        self._step_cache: StaticKVCache | None = None  # the cache (or leading rows) a decode step uses
        self._decode_fn = self._decode_forward
        if compile_decode:
            from gptj.model.packed_linear import unpack_projections

            unpack_projections(model)  # inductor traces plain weights (and packs them itself)
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode_fn = torch.compile(self._decode_forward, mode=mode, dynamic=False)

    def cache_for(self, batch_size: int, max_length: int) -> StaticKVCache:
        """The runner's cache, kept when it has `batch_size` rows of at least `max_length` slots."""
        cache = self.cache
        if cache is None or cache.batch_size != batch_size or cache.max_length < max_length:
            self.cache = self._step_cache = None  # free the old one first
            cache = self.cache = StaticKVCache.for_model(self.model, batch_size, max_length,
                                                         dtype=self.cache_dtype)
            if self.compile_decode:
                cache.mark_static_addresses()
        return cache

    def prefill(self, cache: StaticKVCache, rows: list[int], prompts: list[list[int]],
                pad_multiple: int = 1, starts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `prompts` into cache `rows`; return the final hidden states of every position
        [n, S, d] (padding after each prompt's end) and the prompt lengths [n].

        pad_multiple: right-pad the batch to a multiple of this many tokens (fewer distinct
        shapes for kernels that cache per shape); padding is masked, so results are the same.
        starts: per prompt, how many leading tokens row i already holds (copied in from a prefix
        cache); only the tokens after them are run, and the hidden states and lengths returned
        are those of the tokens run.
        """
        if starts is not None and any(starts):
            return self._extend(cache, rows, prompts, pad_multiple, starts)
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
        if all(len(p) == seq for p in prompts):
            mask = None  # no padding: plain causal attention, which skips the masked half's work
        else:
            causal = slots[None, :] <= slots[:, None]  # [S, S]
            mask = (causal[None] & (slots[None, None, :] < lengths[:, None, None])).unsqueeze(1)
        all_rows = rows == list(range(cache.batch_size))
        cache.prefill(None if all_rows else torch.tensor(rows, device=device), lengths)
        hidden = self.model.hidden_states(ids, position_ids=positions, attn_mask=mask, kv_cache=cache)
        return hidden, lengths

    def _extend(self, cache: StaticKVCache, rows: list[int], prompts: list[list[int]], pad_multiple: int,
                starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        device, n = self.device, len(rows)
        fed = [p[s:] for p, s in zip(prompts, starts)]
        lengths = torch.tensor([len(f) for f in fed], device=device)
        seq = -(-max(len(f) for f in fed) // pad_multiple) * pad_multiple
        ids = torch.zeros(n, seq, dtype=torch.long)
        for i, f in enumerate(fed):
            ids[i, : len(f)] = torch.tensor(f, dtype=torch.long)
        ids = ids.to(device)
        ends = [len(p) for p in prompts]
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(seq, device=device)[None, :]
        slots = torch.arange(max(ends), device=device)
        # Query j of row i (at position starts[i] + j) sees the row's slots up to itself and below
        # the prompt's end: a padding query sees the whole prompt, so no row of the mask is empty.
        mask = (slots[None, None, :] <= positions[:, :, None]) & (
            slots[None, None, :] < torch.tensor(ends, device=device)[:, None, None])
        cache.extend(rows, starts, ends)
        # Padding positions may run past the context: any valid rotation will do for them.
        positions = positions.clamp(max=self.config.max_positions - 1)
        hidden = self.model.hidden_states(ids, position_ids=positions, attn_mask=mask.unsqueeze(1), kv_cache=cache)
        return hidden, lengths

    def decode(self, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
               window: int) -> torch.Tensor:
        """Logits [B, V] of one decode step over `cache` (the runner's cache, or its leading
        rows when eager): tokens [B, 1] written at slots `positions` [B], attending slots
        below `window`. A CUDA-graph step's output is overwritten by the next replay: use it
        before the next call."""
        cache.decode(positions, window)
        self._step_cache = cache
        if self.compile_decode and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return self._decode_fn(tokens, positions, cache.decode_mask_window())

    def _decode_forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(
            tokens, position_ids=positions.unsqueeze(1), attn_mask=mask, kv_cache=self._step_cache
        )
        return self.model.logits_from_hidden(hidden[:, 0])
