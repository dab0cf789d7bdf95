"""AdamW with fp32 state, partitioned across data-parallel replicas (ZeRO-1/2).

Contract with the training loop
-------------------------------
Before `step`, the gradient of every model parameter (in the model's dtype) must hold

    d(loss_sum_of_this_replica / global_token_count) / d(param)  x  loss_scale

i.e. each replica divides its summed token loss by the token count of the WHOLE global batch
(all micro-batches of all replicas), so that SUMMING the gradients over replicas gives exactly
the gradient of the global-batch mean loss. Accumulating several micro-batches simply adds.
With fp16, multiply the loss by `DynamicLossScaler.scale` before backward and pass the same
number as `loss_scale`; then call `scaler.update(result.skipped)`.

Where the gradients live: every parameter's gradient is a view into one flat buffer per AdamW
param group (`.grad` points there, and so does `.main_grad`, into which the model's matmuls and
embedding add their weight gradients directly: gptj/model/main_grad.py).

What `step(lr, loss_scale)` does, on every rank of the world (it is collective):
1. each flat gradient buffer (padded to a multiple of the replica count) is reduce-scattered
   (summed) over the replica group, so each replica holds the summed gradient of its 1/r slice;
2. the global squared norm of that slice (fp32 sums of 4096-element rows, added in fp64) is
   all-reduced over the tensor-parallel and replica groups (together: the whole world); inf/NaN
   anywhere skips the step on every rank (weights unchanged, gradients zeroed) and
   `StepResult.reason` is "nan" or "overflow";
3. the norm counts each element of the full model once: tensor-parallel shards are summed over
   the TP group, replicated parameters (LayerNorms, fc_out bias) are counted on TP rank 0 only,
   replica slices are summed over the replica group; gradients are clipped to `max_grad_norm`
   as `torch.nn.utils.clip_grad_norm_` does. Unscaling and clipping are one factor the fused
   AdamW kernel divides each gradient by as it reads it: no pass of their own;
4. torch's fused AdamW updates this replica's fp32 master slice (two param groups: decoupled
   weight decay for weights, none for biases and LayerNorm parameters);
5. the updated slice reaches every replica (all-gather) and the model parameters;
6. gradients are zeroed.

Memory (the formula the planner uses), per parameter, with r replicas:

    weights + gradients in the model dtype  +  fp32 state / r
    fp32 state = Adam moments (8 B) + the fp32 master copy (4 B) unless the weights are fp32

- fp32 weights: the master IS the weights. The parameters are views into one flat fp32
  buffer whose slice AdamW updates in place; the gradient slice is read where it lies. So
  4 + 4 + 8 / r bytes (16 B at r = 1, as torch.optim.AdamW on the model itself).
- bf16 / fp16 weights: a separate fp32 master slice; the gradient slice is converted to fp32
  in chunks of `CHUNK` elements through one reused 4 MiB buffer, never as a whole, and each
  updated chunk is written back into the (flat) parameters while in cache. So 2 + 2 + 12 / r.

The trained module is the model itself (full fine-tuning) or `gptj.model.lora.LoraAdapters` (only the
adapters; the frozen base has no gradients and no optimizer state). Adapters whose factor is
replicated over the TP group get a partial gradient on each rank; those are summed over the
TP group in step 1 (the tail range of replicated elements, one all-reduce per flat buffer).

With `offload=True` the master slice and the Adam moments live in host memory and AdamW runs on
the host; the reduced gradient slice crosses device -> host and the updated weights host ->
device through pinned staging buffers (pinned only when the model is on CUDA). Without replicas
the flat gradient buffer itself stays on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.adamw import adamw

from gptj.model import GPTJ
from gptj.model.parallel import all_gather_flat, all_reduce, reduce_scatter_flat
from gptj.model.sharding import shard_rules

HOST = torch.device("cpu")
# Elements of a low-precision gradient slice converted to fp32 at a time (4 MiB: cache-sized; a
# multiple of NORM_ROW, so the norm's rows do not depend on it).
CHUNK = 1 << 20
NORM_ROW = 1 << 12  # elements summed in fp32 before the fp64 total (relative error ~1e-7)


@dataclass
class StepResult:
    grad_norm: float  # global norm of the unscaled gradient, before clipping (inf/nan if skipped)
    skipped: bool
    reason: str | None = None  # "overflow" or "nan" when skipped


def _copy(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy across devices, asynchronously when it crosses to or from a GPU."""
    return dst.copy_(src, non_blocking=dst.device != src.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _buffer(numel: int, dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, device=device, pin_memory=pin and device.type == "cpu")


def sum_of_squares(flat: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """fp64 sum of squares of a 1-D tensor, at about the cost of reading it: fp32 norms of
    4096-element rows, their squares added in fp64. A low-precision tensor is converted to fp32
    a chunk at a time through `scratch` (never as a whole); the rows, and so the result, are
    the same for any chunk size that is a multiple of the row."""
    norms = []
    for start in range(0, flat.numel(), CHUNK if flat.dtype != torch.float32 else max(flat.numel(), 1)):
        part = flat[start : start + CHUNK] if flat.dtype != torch.float32 else flat
        if part.dtype != torch.float32:
            part = scratch[: part.numel()].copy_(part)
        whole = part.numel() - part.numel() % NORM_ROW
        norms += [torch.linalg.vector_norm(rows, dim=1) for rows in
                  (part[:whole].view(-1, NORM_ROW), part[whole:].view(1, -1)) if rows.numel()]
    return torch.cat(norms).double().square().sum() if norms else torch.zeros((), dtype=torch.float64)


class _FlatGroup:
    """The parameters of one AdamW param group, laid end to end, and this replica's slice.

    Order: tensor-parallel-split parameters first, then replicated ones, so the elements that
    every TP rank holds identically form one tail range [rep_start, used) of the buffer.
    `flat_params`: parameters on the optimizer's device (no offload asked) become views into
    one flat buffer, so the updated slice is written (or gathered) there once. `in_place`: when
    those are fp32, that slice IS the master (see the module docstring).
    """

    def __init__(self, key, named, replicated, replicas, replica_rank, grad_device, opt_device, pin,
                 offload):
        named = [item for item in named if not replicated[item[0]]] + [
            item for item in named if replicated[item[0]]
        ]
        self.key = key
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.numels = [p.numel() for p in self.params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        used = self.used = sum(self.numels)
        split = [n for name, n in zip(self.names, self.numels) if not replicated[name]]
        self.rep_start = sum(split)
        self.total = -(-used // replicas) * replicas
        self.shard = self.total // replicas
        self.lo = replica_rank * self.shard
        dtype = self.dtype = self.params[0].dtype
        self.grad_flat = _buffer(self.total, dtype, grad_device, pin)
        self.grad_views = self._views(self.grad_flat)
        crosses = opt_device != grad_device
        self.flat_params = not offload and not crosses and all(
            p.dtype == dtype and p.device == opt_device for p in self.params)
        self.in_place = self.flat_params and dtype == torch.float32
        if self.flat_params:
            self.param_flat = _buffer(self.total, dtype, opt_device, False)
            with torch.no_grad():
                for p, view in zip(self.params, self._views(self.param_flat)):
                    view.copy_(p)
                    p.data = view  # the parameter now lives in the flat buffer
            self.param_slice = self.param_flat.narrow(0, self.lo, self.shard)
        if self.in_place:
            self.master = self.param_slice
        else:
            self.master = _buffer(self.shard, torch.float32, opt_device, False)
            self.load_master_from_params()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.step_count = torch.zeros((), dtype=torch.float32, device=opt_device)
        self.grad_staging = _buffer(self.shard, dtype, opt_device, pin) if crosses else None
        self.weight_staging = _buffer(self.shard, dtype, opt_device, pin) if crosses else None

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat.narrow(0, off, n).view_as(p) for p, off, n in zip(self.params, self.offsets, self.numels)]

    def pieces(self):
        """(param, flat_start, flat_stop) for the parts of parameters inside this slice."""
        lo, hi = self.lo, self.lo + self.shard
        for p, off, n in zip(self.params, self.offsets, self.numels):
            start, stop = max(off, lo), min(off + n, hi)
            if start < stop:
                yield p, off, start, stop

    @torch.no_grad()
    def load_master_from_params(self) -> None:
        if self.in_place:
            return  # the master is a slice of the parameters themselves
        self.master.zero_()
        for p, off, start, stop in self.pieces():
            src = p.detach().reshape(-1)[start - off : stop - off]
            self.master[start - self.lo : stop - self.lo].copy_(src)

    @torch.no_grad()
    def collect_grads(self) -> None:
        """Make the flat buffer hold every parameter's gradient (most already point into it)."""
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                _copy(view, p.grad)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the buffer and point each .grad (and .main_grad) back into it where device and
        dtype allow."""
        self.grad_flat.zero_()
        for p, view in zip(self.params, self.grad_views):
            if p.device == view.device and p.dtype == view.dtype:
                if getattr(p, "gradient_via_hooks", False):  # the block streamer's own
                    p.__dict__.pop("main_grad", None)
                else:
                    p.main_grad = view
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view
            elif p.grad is not None:
                p.grad.zero_()  # e.g. a host-side gradient owned by the block streamer

    def counted_norm_range(self, counts_replicated: bool) -> tuple[int, int]:
        """The range of the local slice (relative to it) whose elements enter the global norm."""
        stop = self.shard if counts_replicated else min(max(self.rep_start - self.lo, 0), self.shard)
        return 0, stop

    def adamw(self, grad: torch.Tensor, scratch: torch.Tensor | None, grad_scale: float, lr: float,
              options: dict) -> None:
        """One AdamW update of the master slice from its (scaled) gradient slice `grad`, which
        the fused kernel divides by `grad_scale` as it reads it."""
        scale = None if grad_scale == 1.0 else torch.tensor(grad_scale, dtype=torch.float32,
                                                            device=self.master.device)
        if grad.dtype == torch.float32:
            pieces = [(0, self.shard)]
        else:  # converted chunk by chunk through one reused fp32 buffer
            pieces = [(a, min(a + CHUNK, self.shard)) for a in range(0, self.shard, CHUNK)]
        cast_back = self.flat_params and not self.in_place
        for start, stop in pieces:
            fp32 = grad if len(pieces) == 1 and grad.dtype == torch.float32 else (
                scratch[: stop - start].copy_(grad[start:stop]))
            # The kernel adds one to the step counter it is given: with several chunks each gets
            # a copy of the count, and the group's own counter moves once, below.
            counter = self.step_count if len(pieces) == 1 else self.step_count.clone()
            adamw([self.master[start:stop]], [fp32], [self.exp_avg[start:stop]], [self.exp_avg_sq[start:stop]],
                  [], [counter], fused=True, grad_scale=scale, amsgrad=False, maximize=False, lr=lr, **options)
            if cast_back:  # while the chunk is in cache: the updated weights in the model dtype
                self.param_slice[start:stop].copy_(self.master[start:stop])
        if len(pieces) > 1:
            self.step_count.add_(1)

    @torch.no_grad()
    def write_back(self, group, cast: bool = True) -> None:
        """Bring the updated master slice to every replica and into the parameters (`cast`:
        write the slice in the model dtype first; `adamw` already has)."""
        if self.flat_params:
            if cast and not self.in_place:
                self.param_slice.copy_(self.master)
            if group is not None:  # the parameters are views of param_flat: gather into it
                all_gather_flat(self.param_slice, self.param_flat, group)
            return
        if self.weight_staging is not None:
            self.weight_staging.copy_(self.master)
            shard = _copy(torch.empty_like(self.weight_staging, device=self.grad_flat.device),
                          self.weight_staging)
        else:
            shard = self.master.to(self.grad_flat.dtype)
        all_gather_flat(shard, self.grad_flat, group)
        for p, view in zip(self.params, self.grad_views):
            _copy(p.data, view)


def _replicated(model) -> dict[str, bool]:
    """Parameter name -> True when every TP rank holds all of it."""
    if isinstance(model, GPTJ):
        rules = shard_rules(model.config)
        return {name: rules[name].dim is None for name, _ in model.named_parameters()}
    return model.replicated_parameters()


class ShardedAdamW:
    """AdamW with fp32 state, partitioned across replicas (ZeRO-1/2).

    See the module docstring for what the gradients must hold before `step`, what a step does
    and what it holds in memory. `step`, `load_state_dict` and the constructor are collective
    over the whole world.
    """

    def __init__(
        self,
        model: GPTJ,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        offload: bool = False,
    ):
        self.model = model
        self.ctx = model.ctx
        self.lr = lr
        self.max_grad_norm = max_grad_norm
        self.offload = offload
        self.options = {"beta1": betas[0], "beta2": betas[1], "eps": eps}
        self.weight_decay = weight_decay
        # The device of the resident parameters (the block streamer keeps the embedding there).
        self.device = model.device if isinstance(model, GPTJ) else next(model.parameters()).device
        # Replicated parameters whose gradient is a per-rank partial sum (LoRA's whole factors).
        self.sum_replicated_over_tp = bool(getattr(model, "REPLICATED_GRADS_ARE_PARTIAL", False))
        replicas = self._replicas()
        # Without replicas no collective touches the gradient buffer, so offload keeps it on the host.
        self.grads_on_host = offload and replicas == 1
        grad_device = HOST if self.grads_on_host else self.device
        opt_device = HOST if offload else self.device
        pin = self.device.type == "cuda"

        replicated = _replicated(model)
        no_decay = {
            id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()
        }
        decay, plain = [], []
        for name, p in model.named_parameters():
            (plain if name.endswith("bias") or id(p) in no_decay else decay).append((name, p))
        args = (replicated, replicas, self.ctx.replica_rank if replicas > 1 else 0, grad_device, opt_device, pin,
                offload)
        # Adapters have no biases: an empty group gets no buffer at all.
        self.groups = [_FlatGroup(key, named, *args)
                       for key, named in (("decay", decay), ("no_decay", plain)) if named]
        for g in self.groups:
            g.zero_grads()
        # One fp32 buffer for every low-precision gradient chunk (none when all groups are fp32).
        low = [min(g.shard, CHUNK) for g in self.groups if g.dtype != torch.float32]
        self.scratch = torch.empty(max(low), dtype=torch.float32, device=opt_device) if low else None

    # ---- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float, loss_scale: float = 1.0) -> StepResult:
        replica_group = self.ctx.replica_group
        rank = self.ctx.replica_rank
        shards = []
        for g in self.groups:
            g.collect_grads()
            if self.sum_replicated_over_tp and self.ctx.tp_group is not None and g.rep_start < g.used:
                all_reduce(g.grad_flat[g.rep_start : g.used], self.ctx.tp_group)
            shard = reduce_scatter_flat(g.grad_flat, replica_group, rank)
            if g.grad_staging is not None:
                shard = _copy(g.grad_staging, shard)  # device -> pinned host, asynchronous
            shards.append(shard)
        _sync(self.device)

        norm = self._global_norm(shards) / loss_scale
        if not math.isfinite(norm):
            self.zero_grad()
            return StepResult(norm, True, "nan" if norm != norm else "overflow")
        grad_scale = loss_scale
        if self.max_grad_norm is not None and self.max_grad_norm > 0:
            coef = self.max_grad_norm / (norm + 1e-6)
            if coef < 1.0:
                grad_scale = loss_scale / coef

        self.lr = lr
        for g, shard in zip(self.groups, shards):
            options = {**self.options, "weight_decay": self.weight_decay if g.key == "decay" else 0.0}
            g.adamw(shard, self.scratch, grad_scale, lr, options)
        for g in self.groups:
            g.write_back(replica_group, cast=False)
        _sync(self.device)
        self.zero_grad()
        return StepResult(norm, False, None)

    def _global_norm(self, shards: list[torch.Tensor]) -> float:
        """sqrt of the sum of squares of the full model's (scaled) gradient, each element once."""
        counts_replicated = self.ctx.tp_rank == 0
        squares = torch.zeros((), dtype=torch.float64, device=shards[0].device)
        for g, shard in zip(self.groups, shards):
            start, stop = g.counted_norm_range(counts_replicated)
            squares += sum_of_squares(shard[start:stop], self.scratch)
        squares = squares.to(self.device)
        all_reduce(squares, self.ctx.tp_group, name="gradient norm (tensor parallel)")
        all_reduce(squares, self.ctx.replica_group, name="gradient norm (replicas)")
        return squares.sqrt().item()

    @torch.no_grad()
    def zero_grad(self) -> None:
        for g in self.groups:
            g.zero_grads()

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's flat tensors: contiguous CPU tensors with string keys (safetensors-ready)."""
        out: dict[str, torch.Tensor] = {
            "layout.replicas": torch.tensor([self._replicas(), self.ctx.replica_rank], dtype=torch.int64)
        }
        for g in self.groups:
            out[f"{g.key}.numels"] = torch.tensor(g.numels, dtype=torch.int64)
            out[f"{g.key}.master"] = g.master.detach().to(HOST, copy=True).contiguous()
            out[f"{g.key}.exp_avg"] = g.exp_avg.to(HOST, copy=True).contiguous()
            out[f"{g.key}.exp_avg_sq"] = g.exp_avg_sq.to(HOST, copy=True).contiguous()
            out[f"{g.key}.step"] = g.step_count.to(HOST, torch.float32, copy=True).reshape(1)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], sync_model: bool = True) -> None:
        """Restore this rank's tensors; with `sync_model` also write the loaded master weights
        into the model (collective over the replica group: every rank must call it)."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"optimizer state: missing keys {missing}, unexpected keys {unexpected}")
        for key, ref in expected.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise ValueError(
                    f"optimizer state tensor {key!r}: expected shape {tuple(ref.shape)}, "
                    f"found {tuple(state[key].shape)}"
                )
        if not torch.equal(state["layout.replicas"], expected["layout.replicas"]):
            found = state["layout.replicas"].tolist()
            raise ValueError(
                f"optimizer state tensor 'layout.replicas': saved for replica {found[1]} of {found[0]}, "
                f"this rank is replica {self.ctx.replica_rank} of {self._replicas()}"
            )
        for g in self.groups:
            saved = state[f"{g.key}.numels"].tolist()
            for name, n, m in zip(g.names, g.numels, saved):
                if n != m:
                    raise ValueError(
                        f"optimizer state tensor '{g.key}.numels': parameter {name} has {n} "
                        f"elements here, {m} in the saved state"
                    )
        with torch.no_grad():
            for g in self.groups:
                g.master.copy_(state[f"{g.key}.master"])
                g.exp_avg.copy_(state[f"{g.key}.exp_avg"])
                g.exp_avg_sq.copy_(state[f"{g.key}.exp_avg_sq"])
                g.step_count.copy_(state[f"{g.key}.step"].reshape(()))
            if sync_model:
                for g in self.groups:
                    g.write_back(self.ctx.replica_group)
                _sync(self.device)
                self.zero_grad()

    def _replicas(self) -> int:
        return self.ctx.replicas if self.ctx.replica_group is not None else 1

    # ---- accounting ----------------------------------------------------------------------------
    def memory_report(self) -> dict[str, int | str]:
        """Bytes held by this rank, and where ("device" or "host")."""

        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        def where(on_host: bool) -> str:
            return "host" if on_host else "device"  # by role: on a CPU-only machine host == device

        params = list(self.model.parameters())
        return {
            "model_params_bytes": sum(size(p) for p in params),
            "model_params_location": "device",
            "grads_bytes": sum(size(g.grad_flat) + size(g.grad_staging) for g in self.groups),
            "grads_location": where(self.grads_on_host),
            # fp32 weights are their own master: nothing held beside them.
            "master_bytes": sum(0 if g.in_place else size(g.master) + size(g.weight_staging) for g in self.groups)
            + size(self.scratch),
            "master_location": where(self.offload),
            "optimizer_state_bytes": sum(size(g.exp_avg) + size(g.exp_avg_sq) for g in self.groups),
            "optimizer_state_location": where(self.offload),
        }

