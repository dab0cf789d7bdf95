"""Tiny random Hugging Face GPT-J models: the numerical reference for this project's model."""

from __future__ import annotations

import torch
import transformers

from gptj.config import ModelConfig

TINY = ModelConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, rotary_dim=8,
                   max_positions=64, eos_token_id=0, bos_token_id=0)


def hf_model(config: ModelConfig = TINY, seed: int = 0) -> transformers.GPTJForCausalLM:
    """A random fp32 GPT-J with non-trivial biases and LayerNorms (HF zero-inits those)."""
    torch.manual_seed(seed)
    model = transformers.GPTJForCausalLM(config.to_hf()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def state_reader(state: dict[str, torch.Tensor]):
    """A slice reader over an in-memory HF state dict (see gptj.sharding.SliceReader)."""
    def read(name, dim, start, stop):
        return state[name] if dim is None else state[name].narrow(dim, start, stop - start)
    return read


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
