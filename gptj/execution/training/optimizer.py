"""AdamW on fp32 master weights, partitioned across data-parallel replicas (ZeRO-1/2).

Contract with the training loop
-------------------------------
Before `step`, the `.grad` of every model parameter (in the model's dtype) must hold

    d(loss_sum_of_this_replica / global_token_count) / d(param)  x  loss_scale

i.e. each replica divides its summed token loss by the token count of the WHOLE global batch
(all micro-batches of all replicas), so that SUMMING the gradients over replicas gives exactly
the gradient of the global-batch mean loss. Accumulating several micro-batches simply adds into
`.grad`. With fp16, multiply the loss by `DynamicLossScaler.scale` before backward and pass the
same number as `loss_scale`; then call `scaler.update(result.skipped)`.

What `step(lr, loss_scale)` does, on every rank of the world (it is collective):
1. gradients are laid end to end in flat buffers (one per AdamW param group, padded to a
   multiple of the replica count) and reduce-scattered (summed) over the replica group, so each
   replica holds the summed gradient of its 1/r slice of every buffer;
2. that slice is converted to fp32 and divided by `loss_scale`; one scalar all-reduce over the
   tensor-parallel and replica groups (together: the whole world) gives the global squared norm,
   which also detects inf/NaN anywhere: then the step is skipped on every rank (weights
   unchanged, gradients zeroed) and `StepResult.reason` is "nan" or "overflow";
3. the norm counts each element of the full model once: tensor-parallel shards are summed over
   the TP group, replicated parameters (LayerNorms, fc_out bias) are counted on TP rank 0 only,
   replica slices are summed over the replica group; gradients are clipped to `max_grad_norm`
   exactly as `torch.nn.utils.clip_grad_norm_` does;
4. `torch.optim.AdamW` updates this replica's fp32 master slice (two param groups: decoupled
   weight decay for weights, none for biases and LayerNorm parameters);
5. the updated slice is cast to the model dtype and all-gathered over the replicas into the
   model parameters, so every replica again holds the full weights;
6. gradients are zeroed.

Memory: the model's gradients are views into the flat buffers (no second copy), so per
parameter a replica holds weights + gradients in the model dtype, and 1/r of the fp32 master
(4 B), fp32 gradient slice (4 B) and Adam moments (8 B). This is ZeRO-1 with a reduce-scatter:
the full-size gradient buffer stays, only fp32 state is partitioned.

The trained module is the model itself (full fine-tuning) or `gptj.model.lora.LoraAdapters` (only the
adapters; the frozen base has no gradients and no optimizer state). Adapters whose factor is
replicated over the TP group get a partial gradient on each rank; those are summed over the
TP group in step 1 (the tail range of replicated elements, one all-reduce per flat buffer).

With `offload=True` the master slice, its fp32 gradient and the Adam moments live in host
memory and AdamW runs on the host; the reduced gradient slice crosses device -> host and the
updated weights host -> device through pinned staging buffers (pinned only when the model is on
CUDA; the master and moments never cross the bus, so they stay in ordinary host memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gptj.model import GPTJ
from gptj.model.parallel import all_gather_flat, all_reduce, reduce_scatter_flat
from gptj.model.sharding import shard_rules

HOST = torch.device("cpu")


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


class _FlatGroup:
    """The parameters of one AdamW param group, laid end to end, and this replica's slice.

    Order: tensor-parallel-split parameters first, then replicated ones, so the elements that
    every TP rank holds identically form one tail range [rep_start, used) of the buffer.
    """

    def __init__(self, key, named, replicated, replicas, replica_rank, grad_device, opt_device, pin):
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
        dtype = self.params[0].dtype
        self.grad_flat = _buffer(self.total, dtype, grad_device, pin)
        self.grad_views = [
            self.grad_flat.narrow(0, off, n).view_as(p)
            for p, off, n in zip(self.params, self.offsets, self.numels)
        ]
        self.master = _buffer(self.shard, torch.float32, opt_device, False)
        self.master.grad = torch.zeros_like(self.master)
        crosses = opt_device != grad_device
        self.grad_staging = _buffer(self.shard, dtype, opt_device, pin) if crosses else None
        self.weight_staging = _buffer(self.shard, dtype, opt_device, pin) if crosses else None

    def pieces(self):
        """(param, flat_start, flat_stop) for the parts of parameters inside this slice."""
        lo, hi = self.lo, self.lo + self.shard
        for p, off, n in zip(self.params, self.offsets, self.numels):
            start, stop = max(off, lo), min(off + n, hi)
            if start < stop:
                yield p, off, start, stop

    @torch.no_grad()
    def load_master_from_params(self) -> None:
        self.master.zero_()
        for p, off, start, stop in self.pieces():
            src = p.detach().reshape(-1)[start - off : stop - off]
            self.master[start - self.lo : stop - self.lo].copy_(src)

    @torch.no_grad()
    def collect_grads(self) -> None:
        """Make the flat buffer hold every parameter's gradient (most already point into it)."""
        for p, view in zip(self.params, self.grad_views):
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                _copy(view, p.grad)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the buffer and point each .grad back into it where device and dtype allow."""
        self.grad_flat.zero_()
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not None and p.grad.data_ptr() == view.data_ptr():
                continue
            if p.device == view.device and p.dtype == view.dtype:
                p.grad = view
            elif p.grad is not None:
                p.grad.zero_()  # e.g. a host-side gradient owned by the block streamer

    def counted_norm_range(self, counts_replicated: bool) -> tuple[int, int]:
        """The range of the local slice (relative to it) whose elements enter the global norm."""
        stop = self.shard if counts_replicated else min(max(self.rep_start - self.lo, 0), self.shard)
        return 0, stop

    @torch.no_grad()
    def write_back(self, group) -> None:
        """Cast the master slice to the model dtype, all-gather it, copy into the parameters."""
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
    """AdamW on fp32 master weights, partitioned across replicas (ZeRO-1/2).

    See the module docstring for what the gradients must hold before `step` and what a step does.
    `step`, `load_state_dict` and the constructor are collective over the whole world.
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
        self.max_grad_norm = max_grad_norm
        self.offload = offload
        # The device of the resident parameters (the block streamer keeps the embedding there).
        self.device = model.embed.weight.device if isinstance(model, GPTJ) else next(model.parameters()).device
        # Replicated parameters whose gradient is a per-rank partial sum (LoRA's whole factors).
        self.sum_replicated_over_tp = bool(getattr(model, "REPLICATED_GRADS_ARE_PARTIAL", False))
        replicas = self.ctx.replicas if self.ctx.replica_group is not None else 1
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
        args = (replicated, replicas, self.ctx.replica_rank if replicas > 1 else 0, grad_device, opt_device, pin)
        # Adapters have no biases: an empty group gets no buffer at all.
        self.groups = [_FlatGroup(key, named, *args)
                       for key, named in (("decay", decay), ("no_decay", plain)) if named]
        for g in self.groups:
            g.load_master_from_params()
            g.zero_grads()

        self.adam = torch.optim.AdamW(
            [{"params": [g.master], "weight_decay": weight_decay if g.key == "decay" else 0.0}
             for g in self.groups],
            lr=lr, betas=betas, eps=eps,
            # One fused kernel per tensor instead of a dozen elementwise passes: 1.5x faster on
            # CPU (bench-small: 0.73 s -> 0.49 s per step) and no master-sized temporaries.
            fused=True,
        )
        # Create the moments now, as torch would on the first step, so that memory is visible
        # up front and a state dict exists before any step. The fused kernel keeps its step
        # counter on the parameters' device.
        for g in self.groups:
            self.adam.state[g.master] = {
                "step": torch.tensor(0.0, dtype=torch.float32, device=g.master.device),
                "exp_avg": torch.zeros_like(g.master),
                "exp_avg_sq": torch.zeros_like(g.master),
            }

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
        for g, shard in zip(self.groups, shards):
            g.master.grad.copy_(shard)  # to fp32
            if loss_scale != 1.0:
                g.master.grad.div_(loss_scale)

        norm = self._global_norm()
        if not math.isfinite(norm):
            self.zero_grad()
            return StepResult(norm, True, "nan" if norm != norm else "overflow")
        if self.max_grad_norm is not None and self.max_grad_norm > 0:
            coef = self.max_grad_norm / (norm + 1e-6)
            if coef < 1.0:
                for g in self.groups:
                    g.master.grad.mul_(coef)

        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.step()
        for g in self.groups:
            g.write_back(replica_group)
        _sync(self.device)
        self.zero_grad()
        return StepResult(norm, False, None)

    def _global_norm(self) -> float:
        """sqrt of the sum of squares of the full model's gradient, each element once."""
        counts_replicated = self.ctx.tp_rank == 0
        squares = torch.zeros((), dtype=torch.float64, device=self.groups[0].master.device)
        for g in self.groups:
            start, stop = g.counted_norm_range(counts_replicated)
            # fp64 accumulation: an fp32 norm over millions of elements drifts by ~1e-6; chunks
            # bound the temporary fp64 copy.
            for chunk in g.master.grad[start:stop].split(1 << 24):
                squares += torch.linalg.vector_norm(chunk, dtype=torch.float64).square()
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
            state = self.adam.state[g.master]
            out[f"{g.key}.numels"] = torch.tensor(g.numels, dtype=torch.int64)
            out[f"{g.key}.master"] = g.master.detach().to(HOST, copy=True).contiguous()
            out[f"{g.key}.exp_avg"] = state["exp_avg"].to(HOST, copy=True).contiguous()
            out[f"{g.key}.exp_avg_sq"] = state["exp_avg_sq"].to(HOST, copy=True).contiguous()
            out[f"{g.key}.step"] = state["step"].detach().to(HOST, torch.float32, copy=True).reshape(1)
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
                adam_state = self.adam.state[g.master]
                g.master.copy_(state[f"{g.key}.master"])
                adam_state["exp_avg"].copy_(state[f"{g.key}.exp_avg"])
                adam_state["exp_avg_sq"].copy_(state[f"{g.key}.exp_avg_sq"])
                adam_state["step"].copy_(state[f"{g.key}.step"].reshape(adam_state["step"].shape))
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
            "master_bytes": sum(size(g.master) + size(g.master.grad) + size(g.weight_staging) for g in self.groups),
            "master_location": where(self.offload),
            "optimizer_state_bytes": sum(
                size(self.adam.state[g.master]["exp_avg"]) + size(self.adam.state[g.master]["exp_avg_sq"])
                for g in self.groups
            ),
            "optimizer_state_location": where(self.offload),
        }

