"""GPT-J building blocks from PyTorch primitives, each holding only its tensor-parallel shard.

Shapes use B batch, S query length, T key length, H local heads, D head dim, d model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import main_grad
from .config import ModelConfig
from .parallel import ParallelContext, copy_to_tensor_parallel, reduce_from_tensor_parallel
from .quantized_linear import linear


def _empty(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    # Real values arrive later from a checkpoint or from `init_weights`.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))


class RotaryTables(nn.Module):
    """cos/sin for every position, computed once in fp32 exactly as GPT-J does.

    GPT-J rotates interleaved pairs (x[2i], x[2i+1]) of the first `rotary_dim` dims of each
    head, with angle pos / 10000^(2i / rotary_dim).
    """

    def __init__(self, rotary_dim: int, max_positions: int, device=None):
        super().__init__()
        self.rotary_dim = rotary_dim
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device) / rotary_dim
        inv_freq = 1.0 / (10000**exponent)
        angles = torch.arange(max_positions, dtype=torch.int64, device=device).float()[:, None] * inv_freq
        self.register_buffer("cos", angles.cos(), persistent=False)  # [max_positions, rotary_dim/2]
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotations for [B, S] positions as complex64 [B, S, 1, 1, rotary_dim/2] (broadcast over
        q/k and heads): built once per forward pass, shared by every block."""
        return torch.complex(self.cos[position_ids], self.sin[position_ids])[:, :, None, None]


def _rotate_pairs(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """x [..., rot] (any float dtype) with interleaved pairs (x[2i], x[2i+1]) read as complex
    numbers x[2i] + i x[2i+1], multiplied by `turn` (complex64, broadcastable) in fp32.

    (e + i o)(cos + i sin) = (e cos - o sin) + i (o cos + e sin): GPT-J's interleaved rotary,
    as one vectorised complex multiply instead of strided even/odd slices.
    """
    pairs = x.float().contiguous().unflatten(-1, (-1, 2))
    return torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(-2)


class _RotaryQKV(torch.autograd.Function):
    """Split fused qkv [B, S, 3, H, D] into q, k, v [B, H, S, D] (contiguous), rotating q and k
    (`turn`: complex rotations [B, S, 1, 1, rot/2]).

    Backward is the inverse rotation (multiply by the conjugate) written straight into one
    grad_qkv buffer: no fp32 copies of q and k are saved, and autograd does not replay the
    slice/stack/cat chain (zero-filled buffers and adds) an op-by-op rotary would leave.
    """

    @staticmethod
    def forward(ctx, qkv, turn):
        batch, seq, _, heads, dim = qkv.shape
        rot = 2 * turn.shape[-1]
        outs = [torch.empty(batch, heads, seq, dim, dtype=qkv.dtype, device=qkv.device) for _ in range(3)]
        views = [o.transpose(1, 2) for o in outs]  # [B, S, H, D] views of [B, H, S, D] buffers
        rotated = _rotate_pairs(qkv[:, :, :2, :, :rot], turn) if rot else None
        for i in range(2):
            if rot:
                views[i][..., :rot] = rotated[:, :, i]
            if rot < dim:
                views[i][..., rot:] = qkv[:, :, i, :, rot:]
        views[2].copy_(qkv[:, :, 2])
        ctx.save_for_backward(turn)
        ctx.rot = rot
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        (turn,) = ctx.saved_tensors
        rot = ctx.rot
        batch, heads, seq, dim = grad_v.shape
        grad = torch.empty(batch, seq, 3, heads, dim, dtype=grad_v.dtype, device=grad_v.device)
        for i, g in enumerate((grad_q, grad_k, grad_v)):
            g = g.transpose(1, 2)
            if i < 2 and rot:
                grad[:, :, i, :, :rot] = _rotate_pairs(g[..., :rot], turn.squeeze(2).conj())
                if rot < dim:
                    grad[:, :, i, :, rot:] = g[..., rot:]
            else:
                grad[:, :, i] = g
        return grad, None


def split_qkv_rotary(qkv: torch.Tensor, turn: torch.Tensor):
    """qkv [B, S, 3, H, D] -> (q, k, v) each [B, H, S, D], rotary (`RotaryTables` output)
    applied to q and k."""
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _RotaryQKV.apply(qkv, turn)
    # Without gradients: fewer, larger ops (one rotation of q and k together, views for the
    # rest); attention and the KV cache take the strided [B, H, S, D] views as they are.
    rot, dim = 2 * turn.shape[-1], qkv.shape[-1]
    qk = qkv[:, :, :2]
    if rot:
        rotated = _rotate_pairs(qk[..., :rot], turn).to(qkv.dtype)
        qk = torch.cat((rotated, qk[..., rot:]), dim=-1) if rot < dim else rotated
    return qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)


class VocabParallelEmbedding(nn.Module):
    """Token embedding split by vocab rows; ids outside this shard contribute zeros."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype, device=None):
        super().__init__()
        self.ctx = ctx
        self.rows = config.padded_vocab_size(ctx.tensor_parallel) // ctx.tensor_parallel
        self.vocab_start = ctx.tp_rank * self.rows
        self.weight = _empty(self.rows, config.hidden_size, dtype=dtype, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_group is None:
            return main_grad.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = main_grad.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(out, self.ctx)


def attend(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) v over [B, H, S, D] inputs.

    SDPA keeps scores and softmax in fp32 (bf16 inputs are multiplied exactly and accumulated
    in fp32), matching GPT-J's fp32 attention. `mask` is a bool [B, 1, S, T] (True = may
    attend) or None for plain causal attention over keys that start with the queries.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head attention over this rank's whole heads, from an already projected qkv.

    The q/k/v projection is part of the block's fused input matmul (see `Block`); this module
    holds the output projection, split by input rows, so it returns a partial sum for the block
    to reduce. A KV cache plugs in through `cache.update(k, v)`, which stores the new
    keys/values and returns every key/value the queries may see.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype, device=None):
        super().__init__()
        self.local_heads = config.num_heads // ctx.tensor_parallel
        self.head_dim = config.head_dim
        self.width = self.local_heads * self.head_dim
        self.out_proj_weight = _empty(config.hidden_size, self.width, dtype=dtype, device=device)

    def forward(self, qkv, rope, mask=None, cache=None, lora=None) -> torch.Tensor:
        """qkv [B, S, 3 * H * D] (q, k, v of this rank's heads) -> partial output [B, S, d]."""
        batch, seq, _ = qkv.shape
        q, k, v = split_qkv_rotary(qkv.view(batch, seq, 3, self.local_heads, self.head_dim), rope)
        if cache is not None:
            k, v = cache.update(k, v)
        out = attend(q.to(k.dtype), k, v, mask).to(qkv.dtype)  # a cache may hold k, v in fp32 (kv_cache.py)
        out = out.transpose(1, 2).reshape(batch, seq, self.width)
        partial = linear(out, self.out_proj_weight)
        if lora is not None:  # LoRA hook (gptj/model/lora.py): the row-parallel delta joins the partial sum
            partial = lora.add(("out_proj",), out, partial)
        return partial


class MLP(nn.Module):
    """gelu(fc_in) then fc_out. fc_in's matmul is part of the block's fused input matmul; its
    bias (split by columns) is added here. fc_out is split by input rows.

    `forward` returns fc_out's partial sum WITHOUT its bias: the block adds the bias once,
    after the all-reduce, so it is not counted t times.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype, device=None):
        super().__init__()
        self.local = config.ffn_dim // ctx.tensor_parallel
        self.fc_in_bias = _empty(self.local, dtype=dtype, device=device)
        self.fc_out_weight = _empty(config.hidden_size, self.local, dtype=dtype, device=device)
        self.fc_out_bias = _empty(config.hidden_size, dtype=dtype, device=device)  # replicated

    def forward(self, pre: torch.Tensor, lora=None) -> torch.Tensor:
        """pre = h @ fc_in^T (without bias) [B, S, f_local] -> partial output [B, S, d]."""
        x = F.gelu(pre + self.fc_in_bias, approximate="tanh")
        partial = linear(x, self.fc_out_weight)
        if lora is not None:  # LoRA hook: the row-parallel delta joins the partial sum
            partial = lora.add(("fc_out",), x, partial)
        return partial


class Block(nn.Module):
    """x + attn(ln_1(x)) + mlp(ln_1(x)), with ONE all-reduce in forward and one in backward.

    Attention's q, k, v and the MLP's fc_in all read h = ln_1(x), so they are one matmul:
    `in_proj_weight` stacks this rank's rows [q; k; v; fc_in], [3 * H * D + f_local, d].
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype, device=None):
        super().__init__()
        self.ctx = ctx
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, device=device)
        self.attn = Attention(config, ctx, dtype, device)
        self.mlp = MLP(config, ctx, dtype, device)
        self.split = (3 * self.attn.width, self.mlp.local)
        self.in_proj_weight = _empty(sum(self.split), config.hidden_size, dtype=dtype, device=device)
        self.lora = None  # optional gptj.model.lora.BlockLoRA: low-rank deltas, summed by the all-reduce below

    def forward(self, x, rope, mask=None, cache=None) -> torch.Tensor:
        h = copy_to_tensor_parallel(self.ln_1(x), self.ctx)
        fused = linear(h, self.in_proj_weight)
        if self.lora is not None:  # LoRA hook (gptj/model/lora.py): q, k, v and fc_in deltas from h
            fused = self.lora.add(("q", "k", "v", "fc_in"), h, fused)
        qkv, pre = fused.split(self.split, dim=-1)
        partial = self.attn(qkv, rope, mask, cache, self.lora) + self.mlp(pre, self.lora)
        return x + reduce_from_tensor_parallel(partial, self.ctx) + self.mlp.fc_out_bias


class VocabParallelHead(nn.Module):
    """lm_head (with bias) split by vocab rows; padded rows are masked to -inf."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype, device=None):
        super().__init__()
        self.ctx = ctx
        self.rows = config.padded_vocab_size(ctx.tensor_parallel) // ctx.tensor_parallel
        self.vocab_start = ctx.tp_rank * self.rows
        self.real_rows = max(0, min(self.rows, config.vocab_size - self.vocab_start))
        self.weight = _empty(self.rows, config.hidden_size, dtype=dtype, device=device)
        self.bias = _empty(self.rows, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Local fp32 logits [..., rows]; entries past the real vocab are -inf."""
        h = copy_to_tensor_parallel(h, self.ctx)
        logits = linear(h, self.weight, self.bias).float()
        if self.real_rows < self.rows:  # in place on the whole tensor, not on a slice view of it
            padded = torch.arange(self.rows, device=logits.device) >= self.real_rows
            logits = logits.masked_fill_(padded, -math.inf)
        return logits
