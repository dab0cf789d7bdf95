"""Tiny random GPT-J pairs (Hugging Face reference + this project's model) for generation tests."""

from __future__ import annotations

import torch

from gptj import GPTJ, ParallelContext
from tests.reference import TINY, hf_model, state_reader

# Larger weights than HF's init so greedy continuations vary instead of repeating one token.
WEIGHT_SCALE = 6.0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23], [1], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


def reference_pair(seed: int = 0, ctx: ParallelContext | None = None, config=TINY):
    """(hf_model, our_model) holding the same random weights, both fp32 and in eval mode."""
    hf = hf_model(config, seed=seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(WEIGHT_SCALE)
    ours = GPTJ(config, ctx)
    ours.load_shards(state_reader(hf.state_dict()))
    return hf, ours.eval()


def hf_greedy(hf, prompts, max_new_tokens, eos_token_id=None, pad_token_id=0):
    """transformers `generate` on a left-padded batch with its attention mask; new tokens only."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    out = hf.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id,
    )
    return out[:, longest:].tolist()
