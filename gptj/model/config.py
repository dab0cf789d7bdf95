"""GPT-J model shape: one dataclass, validated early, convertible to and from Hugging Face."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gptj.errors import GPTJError


class ConfigError(GPTJError, ValueError):
    """A model shape or parallel layout that cannot work, explained in words."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a GPT-J model. Defaults are GPT-J 6B (EleutherAI/gpt-j-6b)."""

    vocab_size: int = 50400
    hidden_size: int = 4096
    num_layers: int = 28
    num_heads: int = 16
    rotary_dim: int = 64
    ffn_size: int | None = None  # None means 4 * hidden_size (Hugging Face's n_inner)
    max_positions: int = 2048
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 50256
    bos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return self.ffn_size if self.ffn_size is not None else 4 * self.hidden_size

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Vocab rounded up so every tensor-parallel rank holds the same number of rows."""
        return -(-self.vocab_size // tensor_parallel) * tensor_parallel

    def num_parameters(self) -> int:
        d, f, v = self.hidden_size, self.ffn_dim, self.vocab_size
        per_block = 2 * d + 4 * d * d + (d * f + f) + (f * d + d)
        return v * d + self.num_layers * per_block + 2 * d + (v * d + v)

    def matmul_parameters(self) -> int:
        """Weights that multiply activations: per block q, k, v, out (4 d^2) and fc_in, fc_out
        (2 d f), plus lm_head (d V). The embedding table is a lookup, not a matmul; biases and
        layer norms are elementwise and left out."""
        d, f = self.hidden_size, self.ffn_dim
        return self.num_layers * (4 * d * d + 2 * d * f) + d * self.vocab_size

    def flops_per_token(self, sequence_length: int) -> float:
        """Training FLOPs per token, the numerator of every MFU in this project:

            6 M + 12 L d s

        M = matmul_parameters(): each weight costs 2 FLOPs per token forward and 4 backward.
        12 L d s: attention's scores (q k^T) and weighted values (p v), 2 s d FLOPs each per
        layer forward, times 3 for training; s is the full sequence length (no halving for the
        causal mask, the usual convention).
        """
        return 6.0 * self.matmul_parameters() + 12.0 * self.num_layers * self.hidden_size * sequence_length

    def validate(self, tensor_parallel: int = 1) -> ModelConfig:
        """Raise ConfigError naming the first problem; return self so calls can chain."""
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_positions"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.ffn_size is not None and self.ffn_size <= 0:
            problems.append(f"ffn_size must be positive when set, got {self.ffn_size}")
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.rotary_dim % 2 or self.rotary_dim < 0:
            problems.append(f"rotary_dim must be a non-negative even number, got {self.rotary_dim}")
        if self.num_heads > 0 and self.rotary_dim > self.head_dim:
            problems.append(
                f"rotary_dim {self.rotary_dim} is larger than head_dim {self.head_dim} "
                f"(hidden_size {self.hidden_size} / num_heads {self.num_heads})"
            )
        if tensor_parallel < 1:
            problems.append(f"tensor_parallel must be >= 1, got {tensor_parallel}")
        elif self.num_heads % tensor_parallel:
            problems.append(
                f"num_heads {self.num_heads} is not divisible by tensor_parallel {tensor_parallel}: "
                "attention is split by whole heads"
            )
        elif self.ffn_dim % tensor_parallel:
            problems.append(
                f"ffn size {self.ffn_dim} is not divisible by tensor_parallel {tensor_parallel}"
            )
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        return self

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        presets = {
            "gptj-6b": cls(),
            # The benchmark shape shared by the training and generation benchmarks.
            "bench-small": cls(hidden_size=512, num_layers=8, num_heads=8, rotary_dim=32),
            # Small enough to train for a minute on two CPU cores.
            "tiny": cls(
                vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, rotary_dim=16,
                max_positions=512, eos_token_id=0, bos_token_id=0,
            ),
        }
        if name not in presets:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(presets))}")
        return presets[name]

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    # ---- Hugging Face ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """From a transformers GPTJConfig, or the dict of its config.json."""
        values = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = values.get("model_type")
        if model_type != "gptj":
            raise ConfigError(
                f"not a GPT-J checkpoint: config.json has model_type {model_type!r} "
                f"(architectures {values.get('architectures')}); expected 'gptj'"
            )
        if values.get("activation_function", "gelu_new") != "gelu_new":
            raise ConfigError(
                f"unsupported activation_function {values['activation_function']!r}; "
                "GPT-J uses 'gelu_new'"
            )
        hidden = values.get("n_embd", 4096)
        rotary = values.get("rotary_dim")
        heads = values.get("n_head", 16)
        return cls(
            vocab_size=values.get("vocab_size", 50400),
            hidden_size=hidden,
            num_layers=values.get("n_layer", 28),
            num_heads=heads,
            rotary_dim=rotary if rotary is not None else hidden // heads,
            ffn_size=values.get("n_inner"),
            max_positions=values.get("n_positions", 2048),
            layer_norm_eps=values.get("layer_norm_epsilon", 1e-5),
            eos_token_id=values.get("eos_token_id", 50256),
            bos_token_id=values.get("bos_token_id", 50256),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers' GPTJForCausalLM.from_pretrained reads."""
        return {
            "architectures": ["GPTJForCausalLM"],
            "model_type": "gptj",
            "vocab_size": self.vocab_size,
            "n_positions": self.max_positions,
            "n_embd": self.hidden_size,
            "n_layer": self.num_layers,
            "n_head": self.num_heads,
            "rotary_dim": self.rotary_dim,
            "n_inner": self.ffn_size,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
        }

    def to_hf(self) -> Any:
        from transformers import GPTJConfig

        values = self.to_hf_dict()
        values.pop("architectures")
        values.pop("model_type")
        return GPTJConfig(**values)
