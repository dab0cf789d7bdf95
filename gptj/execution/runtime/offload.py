"""Block weights kept in host memory and streamed to the device one block ahead of use.

Every block's parameters live in one flat host buffer per block (pinned on CUDA); at rest each
parameter's `.data` is a view of it. Embedding, ln_f and lm_head stay resident on the device.

Forward: a forward pre-hook on block i copies its host buffer into a fresh device buffer (or
takes the copy prefetched during block i-1 on a side CUDA stream), points the parameters' `.data`
at it, and starts prefetching block i+1; the forward post-hook points `.data` back at the host.

Backward: while block i runs forward, a saved-tensor hook replaces every saved tensor that is a
view of the block's device buffer (the weights autograd keeps for backward, e.g. `weight.t()`) by
a small token (block, size, stride, offset). When backward unpacks a token the block is brought
back (prefetched when backward reached the block above it), and the next-lower block is
prefetched; blocks above are released. So at most two blocks are on the device at any time.

Gradients: each streamed parameter's gradient arrives on the device; a post-accumulate hook adds
it into a host-side `.grad` (accumulated over micro-batches) and `.grad` stays on the host, which
is where `ShardedAdamW(offload=True)` reads it. The optimizer writes updated weights into the
parameters' host `.data`.

Limits:
- With `model.recompute_blocks`, the checkpointed forward owns the saved tensors; the streamer
  then only streams the forward and the recomputation in backward (which re-runs the forward
  hooks), and a block's device buffer lives until its recomputed graph is consumed. Still ~2
  blocks resident, but prefetch during recomputation is one block behind (synchronous copy).
- Device -> host gradient copies are synchronous (one per parameter per micro-batch).
- On CPU host == device: the copies are real copies into distinct storage, and a released
  device buffer is filled with NaN so any stale reference shows up as wrong values in tests.
"""

from __future__ import annotations

import torch

from gptj.model import GPTJ

HOST = torch.device("cpu")


class _Token:
    """A saved weight view, stored as its geometry in block `index`'s device buffer."""

    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index, t: torch.Tensor):
        self.index, self.size, self.stride, self.offset = index, t.size(), t.stride(), t.storage_offset()


class BlockWeightStreamer:
    def __init__(self, model: GPTJ, device: torch.device, prefetch: int = 1):
        if prefetch != 1:
            raise ValueError(f"prefetch={prefetch}: only one block ahead is implemented")
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = list(model.blocks)
        for name, module in model.named_children():
            if name != "blocks":
                module.to(self.device)
        self.params = [list(b.parameters()) for b in self.blocks]
        self.host: list[torch.Tensor] = []  # one flat host buffer per block
        self.host_views: list[list[torch.Tensor]] = []
        self.host_grads: list[torch.Tensor] = []
        for params in self.params:
            numel = sum(p.numel() for p in params)
            dtype = params[0].dtype
            flat = torch.empty(numel, dtype=dtype, device=HOST, pin_memory=self.cuda)
            grads = torch.zeros(numel, dtype=dtype, device=HOST, pin_memory=self.cuda)
            views, offset = [], 0
            for p in params:
                view = flat.narrow(0, offset, p.numel()).view_as(p)
                view.copy_(p.detach())
                p.data = view
                p.grad = None
                views.append(view)
                offset += p.numel()
            self.host.append(flat)
            self.host_views.append(views)
            self.host_grads.append(grads)
        self.block_bytes = [f.numel() * f.element_size() for f in self.host]
        self.resident_other_bytes = sum(
            p.numel() * p.element_size()
            for name, p in model.named_parameters() if not name.startswith("blocks.")
        )
        self.on_device: dict[int, torch.Tensor] = {}  # block index -> device buffer
        self.ready: dict[int, torch.cuda.Event] = {}
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.peak_resident_blocks = 0
        self.peak_resident_bytes = self.resident_other_bytes
        self.copies = 0
        self.handles: list = []
        self._hooks_ctx: dict[int, object] = {}
        self._backward_block: int | None = None  # lowest block reached by the running backward
        self._in_backward = False
        self._stash: dict[torch.nn.Parameter, torch.Tensor | None] = {}

    # ---- residency ---------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes of parameters on the device now: resident modules + materialised blocks."""
        return self.resident_other_bytes + sum(self.block_bytes[i] for i in self.on_device)

    def _fetch(self, index: int) -> None:
        """Start copying block `index` to a new device buffer (no-op if it is there)."""
        if index in self.on_device or not 0 <= index < len(self.blocks):
            return
        self.copies += 1
        if self.stream is None:
            buffer = torch.empty_like(self.host[index], device=self.device)
            buffer.copy_(self.host[index])
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                buffer = torch.empty_like(self.host[index], device=self.device)
                buffer.copy_(self.host[index], non_blocking=True)
                self.ready[index] = torch.cuda.Event()
                self.ready[index].record(self.stream)
        self.on_device[index] = buffer
        self.peak_resident_blocks = max(self.peak_resident_blocks, len(self.on_device))
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes())

    def _get(self, index: int) -> torch.Tensor:
        """Block `index`'s device buffer, usable on the current stream."""
        self._fetch(index)
        buffer = self.on_device[index]
        event = self.ready.pop(index, None)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            buffer.record_stream(current)  # allocated on the side stream, used on this one
        return buffer

    def _release(self, index: int, poison: bool) -> None:
        buffer = self.on_device.pop(index, None)
        self.ready.pop(index, None)
        if buffer is not None and poison and not self.cuda:
            buffer.fill_(float("nan"))  # a stale reference now gives NaN instead of right values

    # ---- hooks ---------------------------------------------------------------------------------
    def attach(self) -> None:
        if self.handles:
            return
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._before_forward(i)))
            self.handles.append(block.register_forward_hook(self._after_forward(i)))
            for p in self.params[i]:
                # Its gradient must reach autograd's hooks below (which move it to the host), so no
                # layer may add it straight into an optimizer buffer (gptj/model/main_grad.py).
                p.gradient_via_hooks = True
                self.handles.append(p.register_hook(self._before_accumulate(p)))
                self.handles.append(p.register_post_accumulate_grad_hook(self._after_accumulate(i)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for params in self.params:
            for p in params:
                p.__dict__.pop("gradient_via_hooks", None)
        for i in list(self.on_device):
            self._release(i, poison=False)

    def _recomputing(self) -> bool:
        return self.model.recompute_blocks and self.model.training and torch.is_grad_enabled()

    def _before_forward(self, index: int):
        def hook(block, args):
            in_backward = torch._C._current_graph_task_id() != -1
            buffer = self._get(index)
            offset = 0
            for p in self.params[index]:
                p.data = buffer.narrow(0, offset, p.numel()).view_as(p)
                offset += p.numel()
            if torch.is_grad_enabled() and not self._recomputing():
                ctx = torch.autograd.graph.saved_tensors_hooks(self._pack(index), self._unpack)
                ctx.__enter__()
                self._hooks_ctx[index] = ctx
            if in_backward:  # recomputation of a checkpointed block
                self._start_backward()
                for other in [i for i in self.on_device if i > index]:
                    self._release(other, poison=False)
            self._fetch(index - 1 if in_backward else index + 1)

        return hook

    def _to_host(self, index: int) -> None:
        for p, view in zip(self.params[index], self.host_views[index]):
            p.data = view

    def _after_forward(self, index: int):
        def hook(block, args, output):
            ctx = self._hooks_ctx.pop(index, None)
            if ctx is not None:
                ctx.__exit__(None, None, None)
            self._to_host(index)
            # Without saved-tensor hooks (no grad, or recomputation) nothing holds a token, and
            # a recomputed graph keeps its own reference to the buffer until it is consumed.
            self._release(index, poison=not self._recomputing())

        return hook

    def _pack(self, index: int):
        def pack(t: torch.Tensor):
            buffer = self.on_device.get(index)
            if buffer is not None and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                return _Token(index, t)
            return t

        return pack

    def _unpack(self, saved):
        if not isinstance(saved, _Token):
            return saved
        index = saved.index
        self._start_backward()
        if self._backward_block != index:
            self._backward_block = index
            for other in [i for i in self.on_device if i > index]:
                self._release(other, poison=True)
            self._fetch(index)
            self._fetch(index - 1)
        return self._get(index).as_strided(saved.size, saved.stride, saved.offset)

    def _start_backward(self) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self._in_backward = False
        self._backward_block = None
        for i in list(self.on_device):
            self._release(i, poison=not self.model.recompute_blocks)
        for i in range(len(self.blocks)):  # a recomputation may stop before its forward hook
            self._to_host(i)

    def _before_accumulate(self, p: torch.nn.Parameter):
        def hook(grad):
            # Let autograd store the fresh device gradient; the host sum is kept aside.
            self._stash[p] = p.grad
            p.grad = None
            return grad

        return hook

    def _after_accumulate(self, index: int):
        def hook(p: torch.nn.Parameter) -> None:
            host = self._stash.pop(p, None)
            if host is None:  # first micro-batch after the gradients were set to None
                host = self._host_grad_view(index, p)
                host.zero_()
            host.add_(p.grad.to(HOST))
            # A recomputation that stopped early leaves .data on the device buffer.
            p.data = self.host_views[index][self._position(index, p)]
            p.grad = host

        return hook

    def _position(self, index: int, p: torch.nn.Parameter) -> int:
        return next(k for k, q in enumerate(self.params[index]) if q is p)

    def _host_grad_view(self, index: int, p: torch.nn.Parameter) -> torch.Tensor:
        view = self.host_views[index][self._position(index, p)]
        offset = view.storage_offset() - self.host[index].storage_offset()
        return self.host_grads[index].narrow(0, offset, p.numel()).view_as(p)
