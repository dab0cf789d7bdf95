"""Every collective the model uses, in one place.

Layout: world = tensor_parallel x replicas, with the tensor-parallel index fastest, so ranks
0..t-1 form the first tensor-parallel group and stay inside one machine. A `ParallelContext`
with no process groups is the single-process case; every collective below is then the identity.

The model reaches other ranks only through the named autograd functions here:

    copy_to_tensor_parallel     forward: identity      backward: all-reduce   (enter a TP region)
    reduce_from_tensor_parallel forward: all-reduce    backward: identity     (leave a TP region)
    gather_from_tensor_parallel forward: all-gather    backward: take own slice
    vocab_parallel_cross_entropy: three all-reduces of [tokens] vectors, no logits gathered

A collective that fails (a peer died) or times out (a peer hangs longer than the process
group's timeout) raises `CollectiveError` naming the collective, so the log says where the
job stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gptj.errors import GPTJError


@dataclass
class ParallelContext:
    tensor_parallel: int = 1
    replicas: int = 1
    rank: int = 0
    tp_group: Any = None  # None means "no communication needed" (size 1 or no process group)
    replica_group: Any = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.replicas

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def replica_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls) -> ParallelContext:
        return cls()

    @classmethod
    def from_process_group(cls, tensor_parallel: int, timeout: Any = None) -> ParallelContext:
        """Build the groups over an initialised default process group (every rank must call).

        `timeout` (a timedelta) bounds the groups' collectives; None: torch's default.
        """
        if not dist.is_available() or not dist.is_initialized():
            if tensor_parallel != 1:
                raise RuntimeError(
                    f"tensor_parallel={tensor_parallel} needs torch.distributed; "
                    "launch with torchrun --nproc-per-node N"
                )
            return cls.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % tensor_parallel:
            raise RuntimeError(
                f"world size {world} is not divisible by tensor_parallel {tensor_parallel}"
            )
        replicas = world // tensor_parallel
        tp_group = replica_group = None
        # new_group must be called by every rank for every group, in the same order.
        for r in range(replicas):
            ranks = list(range(r * tensor_parallel, (r + 1) * tensor_parallel))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                tp_group = group
        for t in range(tensor_parallel):
            ranks = list(range(t, world, tensor_parallel))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                replica_group = group
        return cls(
            tensor_parallel=tensor_parallel,
            replicas=replicas,
            rank=rank,
            tp_group=tp_group if tensor_parallel > 1 else None,
            replica_group=replica_group if replicas > 1 else None,
        )


# ---- errors ------------------------------------------------------------------------------------


class CollectiveError(GPTJError, RuntimeError):
    """A collective that failed or timed out because another rank died, hung or left."""


def collective_error(name: str, group: Any, err: BaseException) -> CollectiveError:
    """`err` (raised by torch.distributed inside collective `name`) as a CollectiveError."""
    detail = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    what = "timed out" if "timed out" in detail.lower() or "timeout" in detail.lower() else "failed"
    try:
        where = f"rank {dist.get_rank()}, group of {dist.get_world_size(group)} ranks"
    except (RuntimeError, ValueError):
        where = "process group gone"
    return CollectiveError(f"collective {name} {what} ({where}): another rank is hung, dead or "
                           f"gone; see its log ({detail})")


# ---- plain collectives (no autograd) -------------------------------------------------------


def all_reduce(tensor: torch.Tensor, group: Any, op: Any = None, name: str = "all_reduce") -> torch.Tensor:
    """In-place all-reduce; the identity when the group is None. `name` labels errors."""
    if group is not None:
        try:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
        except RuntimeError as err:
            raise collective_error(name, group, err) from err
    return tensor


def all_gather(tensor: torch.Tensor, group: Any, dim: int, name: str = "all_gather") -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim`, in rank order."""
    if group is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(parts, tensor.contiguous(), group=group)
    except RuntimeError as err:
        raise collective_error(name, group, err) from err
    return torch.cat(parts, dim=dim)


def broadcast_json(value: Any, group: Any, src: int = 0) -> Any:
    """Send a JSON-able value from global rank `src` to every rank of `group` (None: identity).

    JSON, not pickle: a rank never unpickles what another sends. CPU tensors, so `group` must
    be a gloo group (e.g. a control group next to NCCL).
    """
    if group is None:
        return value
    sending = dist.get_rank() == src
    payload = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8) if sending else None
    size = torch.tensor([payload.numel() if sending else 0], dtype=torch.long)
    dist.broadcast(size, src=src, group=group)
    if not sending:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=src, group=group)
    return value if sending else json.loads(payload.numpy().tobytes().decode())


def average_gradients_across_replicas(params: list[torch.Tensor], ctx: ParallelContext) -> None:
    """Mean of each gradient over the replicas (plain data parallel, no sharding)."""
    if ctx.replica_group is None:
        return
    for p in params:
        if p.grad is not None:
            all_reduce(p.grad, ctx.replica_group, name="average_gradients_across_replicas").div_(ctx.replicas)


# ---- named autograd functions --------------------------------------------------------------


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group, name="copy_to_tensor_parallel (backward)"), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous(), group, name="reduce_from_tensor_parallel")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, rank):
        ctx.group, ctx.rank, ctx.width = group, rank, x.shape[-1]
        return all_gather(x, group, dim=-1, name="gather_from_tensor_parallel")

    @staticmethod
    def backward(ctx, grad):
        start = ctx.rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None, None


def copy_to_tensor_parallel(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    if ctx.tp_group is None:
        return x
    return _CopyToTensorParallel.apply(x, ctx.tp_group)


def reduce_from_tensor_parallel(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    if ctx.tp_group is None:
        return x
    return _ReduceFromTensorParallel.apply(x, ctx.tp_group)


def gather_from_tensor_parallel(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """All-gather the last dimension (e.g. vocab-sharded logits) across the TP group."""
    if ctx.tp_group is None:
        return x
    return _GatherFromTensorParallel.apply(x, ctx.tp_group, ctx.tp_rank)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocab rows; the full logits are never gathered.

    Each rank holds logits[:, vocab_start:vocab_start+V_local] in fp32. The global max, the
    global sum of exponentials and the target's logit are combined with three all-reduces of
    one number per token. Backward needs no communication: softmax - onehot, locally.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        local_max = logits.max(dim=-1).values
        all_reduce(local_max, group, dist.ReduceOp.MAX, name="vocab_parallel_cross_entropy (max)")
        shifted = logits - local_max.unsqueeze(-1)

        width = logits.shape[-1]
        local_target = targets - vocab_start
        in_shard = (local_target >= 0) & (local_target < width)
        safe_target = local_target.clamp(0, width - 1)
        target_logit = shifted.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(in_shard, target_logit, torch.zeros_like(target_logit))

        exp = shifted.exp_()  # reuse the buffer: `shifted` is not needed again
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([sum_exp, target_logit])
        all_reduce(both, group, name="vocab_parallel_cross_entropy (sums)")
        sum_exp, target_logit = both[0], both[1]

        loss = sum_exp.log() - target_logit
        exp.div_(sum_exp.unsqueeze(-1))  # now the softmax
        ctx.save_for_backward(exp, safe_target, in_shard)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_target, in_shard = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(
            -1, safe_target.unsqueeze(-1), -in_shard.to(grad.dtype).unsqueeze(-1)
        )
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, ctx: ParallelContext
) -> torch.Tensor:
    """Per-token loss [...] from vocab-sharded fp32 logits [..., V_local] and global targets."""
    return _VocabParallelCrossEntropy.apply(local_logits, targets, vocab_start, ctx.tp_group)


# ---- flat-buffer collectives for the sharded optimizer -------------------------------------


def reduce_scatter_flat(flat: torch.Tensor, group: Any, rank_in_group: int) -> torch.Tensor:
    """Sum a 1-D buffer over the group and return this rank's equal slice of the sum.

    `flat.numel()` must be a multiple of the group size. gloo has no reduce-scatter, so there
    the whole buffer is all-reduced (in place) and this rank's slice is returned: the same
    result for r times the traffic, which only CPU tests pay.
    """
    if group is None:
        return flat
    size = dist.get_world_size(group)
    shard = flat.numel() // size
    try:
        if dist.get_backend(group) == "gloo":
            dist.all_reduce(flat, group=group)
            return flat.narrow(0, rank_in_group * shard, shard)
        out = torch.empty(shard, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_tensor(out, flat, group=group)
    except RuntimeError as err:
        raise collective_error("reduce_scatter_flat", group, err) from err
    return out


def all_gather_flat(shard: torch.Tensor, out: torch.Tensor, group: Any) -> torch.Tensor:
    """Fill 1-D `out` with every rank's `shard`, in rank order (`out` = size x shard).

    `shard` may be this rank's own slice of `out` (gathering in place): NCCL takes that as it
    is, and gloo gathers into a buffer of its own before copying into `out`."""
    if group is None:
        return out.copy_(shard)
    try:
        if dist.get_backend(group) == "gloo":
            dist.all_gather(list(out.chunk(dist.get_world_size(group))), shard.contiguous(), group=group)
        else:
            dist.all_gather_into_tensor(out, shard.contiguous(), group=group)
    except RuntimeError as err:
        raise collective_error("all_gather_flat", group, err) from err
    return out
