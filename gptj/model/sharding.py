"""How each parameter of the model is cut from the Hugging Face tensors, and put back together.

One table drives loading (each rank reads only its slices), random initialisation (identical
values for any tensor-parallel size), export to Hugging Face, and gradient comparisons.

A rule says: this local parameter is the concatenation (along dim 0) of slices of one or more
HF tensors (of possibly different sizes), each sliced along `dim` into `tensor_parallel` equal
parts (None = replicated).
`pad_rows` marks vocab-sized tensors whose row count is rounded up to a multiple of t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .parallel import ParallelContext, all_gather


@dataclass(frozen=True)
class ShardRule:
    hf_names: tuple[str, ...]
    dim: int | None  # split dimension of each HF tensor; None = the same on every rank
    pad_rows: bool = False  # vocab rows, rounded up to a multiple of tensor_parallel


def shard_rules(config: ModelConfig) -> dict[str, ShardRule]:
    """Parameter name in this project -> rule; in module order."""
    rules = {"embed.weight": ShardRule(("transformer.wte.weight",), 0, pad_rows=True)}
    for i in range(config.num_layers):
        hf, ours = f"transformer.h.{i}.", f"blocks.{i}."
        rules.update({
            ours + "ln_1.weight": ShardRule((hf + "ln_1.weight",), None),
            ours + "ln_1.bias": ShardRule((hf + "ln_1.bias",), None),
            # q, k, v and fc_in read the same ln_1 output: one fused matmul, one local weight
            # made of each rank's whole heads of q, k, v and its columns of fc_in.
            ours + "in_proj_weight": ShardRule(
                (*(hf + f"attn.{p}_proj.weight" for p in "qkv"), hf + "mlp.fc_in.weight"), 0
            ),
            ours + "attn.out_proj_weight": ShardRule((hf + "attn.out_proj.weight",), 1),
            ours + "mlp.fc_in_bias": ShardRule((hf + "mlp.fc_in.bias",), 0),
            ours + "mlp.fc_out_weight": ShardRule((hf + "mlp.fc_out.weight",), 1),
            ours + "mlp.fc_out_bias": ShardRule((hf + "mlp.fc_out.bias",), None),
        })
    rules.update({
        "ln_f.weight": ShardRule(("transformer.ln_f.weight",), None),
        "ln_f.bias": ShardRule(("transformer.ln_f.bias",), None),
        "lm_head.weight": ShardRule(("lm_head.weight",), 0, pad_rows=True),
        "lm_head.bias": ShardRule(("lm_head.bias",), 0, pad_rows=True),
    })
    return rules


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor must have for this config."""
    d, f, v = config.hidden_size, config.ffn_dim, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, d)}
    for i in range(config.num_layers):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.q_proj.weight": (d, d), p + "attn.k_proj.weight": (d, d),
            p + "attn.v_proj.weight": (d, d), p + "attn.out_proj.weight": (d, d),
            p + "mlp.fc_in.weight": (f, d), p + "mlp.fc_in.bias": (f,),
            p + "mlp.fc_out.weight": (d, f), p + "mlp.fc_out.bias": (d,),
        })
    shapes.update({
        "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,),
        "lm_head.weight": (v, d), "lm_head.bias": (v,),
    })
    return shapes


def slice_range(full_size: int, rule: ShardRule, ctx: ParallelContext) -> tuple[int, int]:
    """[start, stop) of this rank's slice along rule.dim, before any padding."""
    t = ctx.tensor_parallel
    part = -(-full_size // t) if rule.pad_rows else full_size // t
    start = ctx.tp_rank * part
    return min(start, full_size), min(start + part, full_size)


def local_rows(rule: ShardRule, config: ModelConfig, ctx: ParallelContext) -> list[int]:
    """Rows each HF tensor of a multi-tensor rule (split along dim 0) gives this rank."""
    shapes = hf_shapes(config)
    return [shapes[h][0] // ctx.tensor_parallel for h in rule.hf_names]


# A reader returns rows [start, stop) of HF tensor `name` along `dim` (or all of it if dim is None).
SliceReader = Callable[[str, "int | None", int, int], torch.Tensor]


def read_local_shard(
    name: str, config: ModelConfig, ctx: ParallelContext, read: SliceReader
) -> torch.Tensor:
    """Build this rank's value of parameter `name` from slices of the HF tensors."""
    rule = shard_rules(config)[name]
    shapes = hf_shapes(config)
    pieces = []
    for hf_name in rule.hf_names:
        if rule.dim is None:
            pieces.append(read(hf_name, None, 0, 0))
            continue
        full = shapes[hf_name][rule.dim]
        start, stop = slice_range(full, rule, ctx)
        piece = read(hf_name, rule.dim, start, stop)
        if rule.pad_rows:
            rows = config.padded_vocab_size(ctx.tensor_parallel) // ctx.tensor_parallel
            if piece.shape[0] < rows:
                pad = piece.new_zeros((rows - piece.shape[0], *piece.shape[1:]))
                piece = torch.cat([piece, pad])
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def gather_to_hf(
    name: str, local: torch.Tensor, config: ModelConfig, ctx: ParallelContext
) -> dict[str, torch.Tensor]:
    """The full HF tensors behind local tensor `name` (a parameter or its gradient).

    Collective over the tensor-parallel group: every TP rank must call it in the same order.
    """
    rule = shard_rules(config)[name]
    if rule.dim is None:
        return {rule.hf_names[0]: local}
    pieces = [local] if len(rule.hf_names) == 1 else local.split(local_rows(rule, config, ctx), dim=0)
    out = {}
    for hf_name, piece in zip(rule.hf_names, pieces):
        full = all_gather(piece, ctx.tp_group, dim=rule.dim)
        if rule.pad_rows:
            full = full[: config.vocab_size]
        out[hf_name] = full
    return out
