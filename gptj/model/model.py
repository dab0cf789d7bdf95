"""The GPT-J language model: embedding -> blocks -> ln_f -> vocab-parallel lm_head.

Two ways out:
- training: `token_losses` / `loss` use vocab-parallel cross-entropy; full logits are never
  gathered;
- inference: `logits` gathers the vocab shards for all positions or only the last ones.

The model knows nothing of loops, files or optimizers. Parallelism is given by a
`ParallelContext`; with the default single-process context there is no communication at all.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layers import Block, RotaryTables, VocabParallelEmbedding, VocabParallelHead
from .main_grad import main_grad_of
from .parallel import ParallelContext, gather_from_tensor_parallel, vocab_parallel_cross_entropy
from .sharding import hf_shapes, read_local_shard, shard_rules


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, S, S]: causal, and only within equal segment ids.

    Segment 0 marks padding; a padded query still sees itself so that no softmax row is empty.
    Built once per forward and shared by every block.
    """
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril_()
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    real = (segment_ids != 0).unsqueeze(1)
    eye = torch.eye(seq, dtype=torch.bool, device=segment_ids.device)
    return ((same & real & causal) | eye).unsqueeze(1)


class _HeadCrossEntropy(torch.autograd.Function):
    """lm_head + per-token cross-entropy when one rank holds the whole vocab.

    The unfused path materialises fp32 logits [T, V], an fp32 softmax saved for backward and
    an fp32 clone of it in backward: about ten passes over the largest tensor of the step.
    Here the logits are computed once in the model's dtype, the softmax statistics are taken
    in fp32 over small row chunks, and the logits buffer is overwritten in place with
    softmax - onehot (the gradient for a unit loss). Backward folds the per-token loss
    gradient into the small [T, d] operands, so no further pass over [T, V] is needed.
    The numbers are those of `lm_head` + `vocab_parallel_cross_entropy`, up to rounding.

    `weight` may be a frozen quantized or packed head (gptj.model.quantized_linear.QuantizedLinear,
    gptj.model.packed_linear.PackedLinear): it is dequantized to the hidden dtype in forward and
    again in backward, never saved.
    """

    # fp32 working set per chunk: large enough that per-op overhead is amortised, small
    # next to the [T, V] logits.
    CHUNK_ELEMENTS = 1 << 23

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        flat = hidden.reshape(-1, hidden.shape[-1])
        ctx.quantized = None if isinstance(weight, torch.Tensor) else weight
        if ctx.quantized is not None:
            weight = ctx.quantized.dequantize(hidden.dtype)
        grad_logits = F.linear(flat, weight, bias)  # becomes softmax - onehot below
        width = grad_logits.shape[-1]
        targets = targets.reshape(-1)
        in_range = (targets >= 0) & (targets < width)
        safe = targets.clamp(0, width - 1).unsqueeze(-1)
        drop = -in_range.to(torch.float32).unsqueeze(-1)
        losses = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        rows = max(1, _HeadCrossEntropy.CHUNK_ELEMENTS // width)
        scratch = None
        if grad_logits.dtype != torch.float32:  # one fp32 buffer reused by every chunk
            scratch = torch.empty(min(rows, flat.shape[0]), width, dtype=torch.float32, device=flat.device)
        for start in range(0, flat.shape[0], rows):
            stop = min(start + rows, flat.shape[0])
            block = grad_logits[start:stop]
            work = block if scratch is None else scratch[: stop - start].copy_(block)
            work.sub_(work.amax(dim=-1, keepdim=True))
            target_logit = work.gather(-1, safe[start:stop]).squeeze(-1)
            target_logit = torch.where(in_range[start:stop], target_logit, 0.0)
            sum_exp = work.exp_().sum(dim=-1)
            losses[start:stop] = sum_exp.log() - target_logit
            work.div_(sum_exp.unsqueeze(-1))
            work.scatter_add_(-1, safe[start:stop], drop[start:stop])
            if scratch is not None:
                block.copy_(work)
        ctx.save_for_backward(flat, weight if ctx.quantized is None else None, grad_logits)
        ctx.hidden_shape = hidden.shape
        ctx.main_weight, ctx.main_bias = main_grad_of(weight), main_grad_of(bias)
        return losses.view(ctx.hidden_shape[:-1])

    @staticmethod
    def backward(ctx, grad_losses):
        flat, weight, grad_logits = ctx.saved_tensors
        if ctx.quantized is not None:
            weight = ctx.quantized.dequantize(grad_logits.dtype)
        scale = grad_losses.reshape(-1, 1).float()
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ weight).float().mul_(scale).to(flat.dtype)
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        # The weight gradient is grad_logits^T @ (hidden * scale), the bias gradient
        # grad_logits^T @ scale; each goes into the optimizer's buffer when the parameter has
        # one (gptj/model/main_grad.py), so no [V, d] result is allocated.
        if ctx.needs_input_grad[1]:
            scaled = (flat.float() * scale).to(flat.dtype)
            if ctx.main_weight is not None:
                ctx.main_weight.addmm_(grad_logits.t(), scaled)
            else:
                grad_weight = grad_logits.t() @ scaled
        if ctx.needs_input_grad[2]:
            grad_bias = (grad_logits.t() @ scale.to(grad_logits.dtype)).squeeze(-1)
            if ctx.main_bias is not None:
                ctx.main_bias.add_(grad_bias)
                grad_bias = None
        return grad_hidden, grad_weight, grad_bias, None


def random_reader(config: ModelConfig, seed: int = 0, std: float = 0.02):
    """A slice reader (see sharding.py) of random HF tensors, as Hugging Face initialises GPT-J.

    Each full HF tensor is drawn from a generator seeded by (seed, tensor name), then sliced, so
    every tensor-parallel size sees the same numbers.
    """
    shapes = hf_shapes(config)

    def random_slice(hf_name, dim, start, stop):
        digest = hashlib.sha256(f"{seed}:{hf_name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        shape = shapes[hf_name]
        if hf_name.endswith((".bias",)) and "ln_" not in hf_name:
            full = torch.zeros(shape)
        elif "ln_" in hf_name:
            full = torch.ones(shape) if hf_name.endswith("weight") else torch.zeros(shape)
        else:
            full = torch.empty(shape).normal_(0.0, std, generator=gen)
        return full if dim is None else full.narrow(dim, start, stop - start)

    return random_slice


class GPTJ(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        ctx: ParallelContext | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.ctx = ctx or ParallelContext.single()
        self.config = config.validate(self.ctx.tensor_parallel)
        self.embed = VocabParallelEmbedding(config, self.ctx, dtype, device)
        self.blocks = nn.ModuleList(Block(config, self.ctx, dtype, device) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, device=device)
        self.lm_head = VocabParallelHead(config, self.ctx, dtype, device)
        self.rotary = RotaryTables(config.rotary_dim, config.max_positions, device=device)
        self.recompute_blocks = False  # activation recomputation, set by the training engine
        self.quantization = None  # a gptj.model.quantized_linear.QuantSpec once projections are quantized

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the embedding's: projections may be quantized)."""
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the model computes (the embedding stays there when block weights stream)."""
        return self.embed.weight.device

    # ---- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> GPTJ:
        """Random weights as Hugging Face initialises GPT-J, identical for any TP size.

        Each full HF tensor is drawn from a generator seeded by (seed, tensor name), then this
        rank keeps its slice, so TP=1 and TP=t models hold the same numbers.
        """
        self.load_shards(random_reader(self.config, seed, std))
        return self

    @torch.no_grad()
    def load_shards(self, read) -> None:
        """Fill every parameter from `read(hf_name, dim, start, stop)` (see sharding.py)."""
        params = dict(self.named_parameters())
        for name in shard_rules(self.config):
            value = read_local_shard(name, self.config, self.ctx, read)
            target = params[name]
            if value.shape != target.shape:
                raise ValueError(f"{name}: expected shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)

    # ---- forward -----------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache=None,
    ) -> torch.Tensor:
        """ln_f(blocks(embed(ids))) as [B, S, d].

        position_ids: [B, S]; default 0..S-1 (plus the cache offset is the caller's job).
        segment_ids: [B, S] ints; attention stays within equal ids, 0 = padding.
        attn_mask: an explicit bool [B, 1, S, T] (e.g. from a KV cache); overrides segment_ids.
        kv_cache: an object with `.layer(i)` returning something with `update(k, v)`.
        """
        batch, seq = input_ids.shape
        if seq > self.config.max_positions and position_ids is None:
            raise ValueError(f"sequence length {seq} exceeds max_positions {self.config.max_positions}")
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        if attn_mask is None and segment_ids is not None:
            attn_mask = attention_mask_from_segments(segment_ids)
        rope = self.rotary(position_ids)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            cache = kv_cache.layer(i) if kv_cache is not None else None
            if self.recompute_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, attn_mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, cache)
        return self.ln_f(x)

    def token_losses(self, input_ids, labels, **kwargs) -> torch.Tensor:
        """Per-token cross-entropy [B, S] in fp32 (unmasked: the caller weights it)."""
        hidden = self.hidden_states(input_ids, **kwargs)
        head = self.lm_head
        if self.ctx.tp_group is None and head.real_rows == head.rows:
            return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, labels)
        local_logits = head(hidden)
        return vocab_parallel_cross_entropy(local_logits, labels, head.vocab_start, self.ctx)

    def loss(self, input_ids, labels, loss_mask=None, **kwargs) -> torch.Tensor:
        """Mean loss over tokens where loss_mask is nonzero (all tokens when None)."""
        losses = self.token_losses(input_ids, labels, **kwargs)
        if loss_mask is None:
            return losses.mean()
        mask = loss_mask.to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp_min(1.0)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gathered fp32 logits [..., vocab_size]; padded vocab entries are dropped."""
        full = gather_from_tensor_parallel(self.lm_head(hidden), self.ctx)
        return full[..., : self.config.vocab_size]

    def logits(self, input_ids, last_only: bool = False, **kwargs) -> torch.Tensor:
        """Full-vocab logits for every position, or [B, vocab] for the last position only."""
        hidden = self.hidden_states(input_ids, **kwargs)
        if last_only:
            hidden = hidden[:, -1]
        return self.logits_from_hidden(hidden)

    def forward(self, input_ids, labels=None, loss_mask=None, **kwargs):
        if labels is None:
            return self.logits(input_ids, **kwargs)
        return self.loss(input_ids, labels, loss_mask, **kwargs)
