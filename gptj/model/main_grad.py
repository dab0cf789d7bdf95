"""Weight gradients written straight into a buffer the optimizer owns.

A parameter may carry `param.main_grad`: a tensor of its shape and dtype (the optimizer's view
into one flat gradient buffer). Then the backward passes below add the weight's gradient into
it in place (`addmm_` / `index_add_`) and hand autograd no gradient for that parameter.
Without `main_grad` they return the gradient as plain autograd would.

Why: a weight gradient is the largest tensor of a backward pass (the embedding's [V, d], a
block's fused [28672, 4096] at GPT-J 6B widths). Computed into a new tensor, each one is fresh
memory the operating system must map page by page, then one more pass adds it into the
optimizer's buffer. Into the buffer, the matmul itself does the accumulation (beta = 1) over
memory that is already mapped, and nothing new of that size is allocated.

Gradient values are those of autograd up to the order of additions (a second micro-batch is
added as each product is, not as one sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def main_grad_of(param: torch.Tensor | None) -> torch.Tensor | None:
    """The buffer `param`'s gradient accumulates into, or None (plain autograd)."""
    return None if param is None else getattr(param, "main_grad", None)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _Linear(torch.autograd.Function):
    """x [N, in] @ weight^T (+ bias) whose weight and bias gradients go into their `main_grad`
    (2-D in and out: a view made inside a Function could not be written in place after)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.main_weight, ctx.main_bias = main_grad_of(weight), main_grad_of(bias)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[1]:
            if ctx.main_weight is not None:
                ctx.main_weight.addmm_(grad_out.t(), x)
            else:
                grad_w = grad_out.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            if ctx.main_bias is not None:
                ctx.main_bias.add_(grad_out.sum(0))
            else:
                grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the weight's (and bias's) gradient added into `main_grad` when it has one."""
    if main_grad_of(weight) is None or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    out = _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


class _Embedding(torch.autograd.Function):
    """weight[ids] whose gradient rows are added into `weight.main_grad` (only the rows used)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.main_weight = main_grad_of(weight)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        ctx.main_weight.index_add_(0, ids.reshape(-1), _rows(grad_out).to(ctx.main_weight.dtype))
        return None, None


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding, with the weight's gradient added into `main_grad` when it has one."""
    if main_grad_of(weight) is None or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.embedding(ids, weight)
    return _Embedding.apply(ids, weight)
