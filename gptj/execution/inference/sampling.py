"""Choosing the next token from fp32 logits: greedy, temperature, top-k, top-p.

Reproducibility: every prompt owns a random stream seeded from (seed, prompt index), so a
prompt's samples do not depend on the batch it runs in, on the order rows are refilled, or
on the tensor-parallel rank (every rank draws the same numbers from the same streams and
sees the same gathered logits, so all ranks pick the same token).

Sampling uses the Gumbel-max trick: token = argmax(logits/T + g) with g = -log(-log(u)),
u uniform from the prompt's stream (one draw of `vocab` uniforms per generated token). This
samples exactly from softmax(logits/T) restricted to the allowed set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no limit

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def prompt_generator(seed: int, prompt_index: int) -> torch.Generator:
    """The CPU random stream of one prompt: independent of batching and rank."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits / temperature with tokens outside top-k and top-p set to -inf ([n, V] fp32).

    top-k keeps the k largest (ties at the k-th value are kept too); top-p keeps the smallest
    set of most likely tokens whose probability reaches top_p (the most likely token always).
    """
    scaled = logits / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """Next token per row [n] (int64, on logits' device) from fp32 logits [n, V].

    `generators[i]` is row i's random stream (unused when greedy).
    """
    if params.greedy:
        # max().indices: the first maximal index like argmax, and faster on CPU (NOTES.md).
        return logits.max(dim=-1).indices
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling needs one generator per row")
    scaled = filter_logits(logits, params)
    vocab = scaled.shape[-1]
    uniform = torch.stack([torch.rand(vocab, generator=g) for g in generators])
    uniform = uniform.clamp_(min=torch.finfo(torch.float32).tiny).to(scaled.device)
    gumbel = -torch.log(-torch.log(uniform))
    return (scaled + gumbel).max(dim=-1).indices
