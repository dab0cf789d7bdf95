"""Several LoRA adapters over one frozen base in one batch, chosen per batch row.

Every block's `lora` hook (gptj/model/layers.py) is handed a `BlockMultiLoRA` instead of a single
adapter's `BlockLoRA`. The base matmul still runs once for the whole batch; the hook then adds,
for each row b, the delta of that row's adapter only:

    delta_b = (x_b A_{i_b}^T) * scaling_{i_b}  B_{i_b}^T          i_b = row_adapters[b]

The adapters' factors are stacked along a leading adapter axis. Two ways compute the deltas:
- few adapters (at most `DENSE_MAX_ADAPTERS`): x times every adapter's A at once (the stacks
  side by side along the rank, [n rank, in]) for the whole batch, a row mask zeroing the columns
  of the other adapters (each adapter's scaling folded in), then one matmul with every adapter's
  B side by side ([out, n rank]). The dense matmuls read each factor once per step; the extra
  columns cost n x the delta's few FLOPs, less than gathering a copy of the factors per row.
- many adapters: each row's A and B gathered by the index tensor, then batched matmuls, whose
  work does not grow with the number of adapters.
Index 0 is "no adapter": its factors are zero (no column of the mask), so such a row gets the
base's output. Ranks differ between adapters; every factor is zero-padded to the largest rank (the
padded rank columns multiply zeros, adding exactly nothing), and a target an adapter does not
adapt holds zeros for it.

The stacked factors are built from each adapter's `LoraAdapters` (gptj/model/lora.py), which already
hold this tensor-parallel rank's shards, so they split exactly as a single adapter does. The
base may be plain or quantized (int8 / int4): the hook only ever sees the layer's input and
output activations.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .lora import ROW_PARALLEL, TARGETS, LoraAdapters, LoraConfigError, target_dims

NO_ADAPTER = 0  # the row index of "the base alone"
# Up to this many loaded adapters the deltas take the dense path. In decode the dense path beats
# the per-row gather up to 16 adapters and breaks even near 32, while a prefill loses a little
# from 8 on (benchmarks/bench_multi_lora.py; numbers in NOTES.md). Decode steps are most of
# serving's delta time (64 per request against one prefill), so 8 keeps the decode gain while the
# prefill loss stays small.
DENSE_MAX_ADAPTERS = 8


class BlockMultiLoRA(nn.Module):
    """One block's stacked adapters: A [n + 1, rank, in_local] and B [n + 1, out_local, rank] per
    target, index 0 zero. `add` reads the rows' adapter indices from the owning `MultiLoRA`."""

    def __init__(self, owner: MultiLoRA, widths: dict[str, int], fans: dict[str, int], dtype, device):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (a cycle)
        self.widths, self.fans, self.dtype, self.device = widths, fans, dtype, device
        self.rank = 0
        self.count = 1  # index 0: no adapter
        self.targets: tuple[str, ...] = ()
        self._dense: dict[tuple[str, ...], tuple] = {}
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()

    def _resized(self, target: str, count: int, rank: int, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero A and B for `count` adapters of `rank`, holding the current adapters `keep` in order."""
        a = torch.zeros(count, rank, self.fans[target], dtype=self.dtype, device=self.device)
        b = torch.zeros(count, self.widths[target], rank, dtype=self.dtype, device=self.device)
        if target in self.A:
            r = min(rank, self.rank)
            a[: len(keep), :r] = self.A[target][keep, :r]
            b[: len(keep), :, :r] = self.B[target][keep, :, :r]
        return a, b

    def _store(self, stacks: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, count: int) -> None:
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for target, (a, b) in stacks.items():
            self.A[target] = nn.Parameter(a, requires_grad=False)
            self.B[target] = nn.Parameter(b, requires_grad=False)
        self.targets = tuple(stacks)
        self.rank, self.count = rank, count
        self._dense: dict[tuple[str, ...], tuple] = {}  # the dense path's factors, rebuilt on change

    def append(self, block, rank: int) -> None:
        """One more adapter (a `BlockLoRA`) at index `count`; every factor padded to `rank`."""
        keep = list(range(self.count))
        stacks = {}
        for target in TARGETS:
            if target not in self.A and target not in block.pairs:
                continue
            a, b = self._resized(target, self.count + 1, rank, keep)
            if target in block.pairs:
                pair = block.pairs[target]
                r = pair.lora_A.shape[0]
                a[self.count, :r] = pair.lora_A.detach().to(self.dtype)
                b[self.count, :, :r] = pair.lora_B.detach().to(self.dtype)
            stacks[target] = (a, b)
        self._store(stacks, rank, self.count + 1)

    def drop(self, index: int, rank: int, adapted: set[str]) -> None:
        """Forget the adapter at `index` (later ones move down one); `rank` and `adapted` (the
        targets some remaining adapter adapts) size what is kept."""
        keep = [i for i in range(self.count) if i != index]
        stacks = {t: self._resized(t, len(keep), rank, keep) for t in TARGETS if t in self.A and t in adapted}
        self._store(stacks, rank, len(keep))

    def add(self, targets: tuple[str, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the outputs of `targets` side by side, [B, S, sum of widths]) plus each row's own
        adapter's deltas from the common input x [B, S, in]."""
        present = tuple(t for t in targets if t in self.A)
        owner = self._owner[0]
        if not present or owner.row_adapters is None:  # None: every row is the base alone
            return y
        rows = owner.row_adapters
        if rows.dim() == 0:  # one adapter for every row
            rows = rows.expand(x.shape[0])
        if rows.shape[0] != x.shape[0]:
            raise RuntimeError(f"MultiLoRA: set_rows must give one adapter index per batch row "
                               f"({x.shape[0]} rows, found {rows.shape[0]})")
        if self.count - 1 <= owner.dense_limit:
            deltas = self._dense_deltas(present, x, owner.row_mask(x.shape[0], x.dtype))
        else:
            deltas = self._gathered_deltas(present, x, rows)
        offset = 0  # each delta added into its target's columns of y (a fresh output): no zeros, no copies
        for target in targets:
            if target in deltas:
                y[..., offset:offset + self.widths[target]] += deltas[target]
            offset += self.widths[target]
        return y

    def _dense_factors(self, present: tuple[str, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A of every present target and adapter side by side [P n rank, in]; per target, B of
        every adapter side by side [out, n rank]. Built once per set of adapters."""
        cached = self._dense.get(present)
        if cached is None:
            n = self.count - 1
            a = torch.cat([self.A[t][1:].reshape(n * self.rank, self.fans[t]) for t in present])
            b = [self.B[t][1:].permute(1, 0, 2).reshape(self.widths[t], n * self.rank) for t in present]
            cached = self._dense[present] = (a, b)
        return cached

    def _dense_deltas(self, present, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every adapter's low-rank product for every row, the other adapters' columns masked to zero."""
        a, b = self._dense_factors(present)
        low = torch.matmul(x, a.t()).view(*x.shape[:-1], len(present), -1)  # [B, S, P, n rank]
        low.mul_(mask.view(x.shape[0], *([1] * (x.dim() - 1)), -1))
        return {t: torch.matmul(low[..., i, :], b[i].t()) for i, t in enumerate(present)}

    def _gathered_deltas(self, present, x: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each row's own A and B gathered by its index, then batched matmuls."""
        scale = self._owner[0].scaling[rows].to(x.dtype).view(-1, 1, 1)
        # Every present target's A of the row's adapter side by side: one batched matmul.
        a = torch.cat([self.A[t][rows] for t in present], dim=1)  # [B, k rank, in]
        low = torch.bmm(x, a.transpose(1, 2)) * scale  # [B, S, k rank]
        return {t: torch.bmm(low[..., i * self.rank:(i + 1) * self.rank], self.B[t][rows].transpose(1, 2))
                for i, t in enumerate(present)}


class MultiLoRA(nn.Module):
    """Named adapters (each a `LoraAdapters` for the same base and parallel layout) stacked for
    per-row use. `attach(model)` hands every block its `BlockMultiLoRA`; before each forward,
    `set_rows(indices)` says which adapter every batch row uses (`index(name)`; 0 = none).

    `add` and `remove` change the set between forwards (an index may move on `remove`, so
    indices are looked up again for every forward). `MultiLoRA.empty(model)` holds none yet."""

    def __init__(self, adapters: dict[str, LoraAdapters], base=None):
        super().__init__()
        if not adapters and base is None:
            raise LoraConfigError("MultiLoRA needs at least one adapter")
        first = next(iter(adapters.values()), None)
        source = first if first is not None else base
        self.config = source.config
        self.tensor_parallel = source.ctx.tensor_parallel
        param = next(source.parameters())
        dtype, device = param.dtype, param.device
        if first is None:  # an empty set over a base: the dtype its activations have
            dtype = base.dtype
        self.names: list[str] = []
        self.settings: dict[str, object] = {}  # each adapter's LoraSettings, by name
        self.register_buffer("scaling", torch.zeros(1, dtype=torch.float32, device=device))
        self.row_adapters: torch.Tensor | None = None
        self.dense_limit = DENSE_MAX_ADAPTERS  # at most this many adapters: the dense path
        self._mask: tuple | None = None  # (rows, dtype, mask) of the last row_mask
        widths = {t: _local_dims(self.config, self.tensor_parallel, t)[1] for t in TARGETS}
        fans = {t: _local_dims(self.config, self.tensor_parallel, t)[0] for t in TARGETS}
        self.blocks = nn.ModuleList(BlockMultiLoRA(self, widths, fans, dtype, device)
                                    for _ in range(self.config.num_layers))
        for name, lora in adapters.items():
            self.add(name, lora)

    @classmethod
    def empty(cls, model) -> MultiLoRA:
        return cls({}, base=model)

    @property
    def rank(self) -> int:
        return self.blocks[0].rank if len(self.blocks) else 0

    def add(self, name: str, lora: LoraAdapters) -> None:
        """Stack one more adapter under `name` (the set's rank grows to its rank if larger)."""
        if name in self.names:
            raise LoraConfigError(f"adapter {name!r} is already loaded")
        if lora.config.to_dict() != self.config.to_dict() or lora.ctx.tensor_parallel != self.tensor_parallel:
            raise LoraConfigError(f"adapter {name!r} was built for a different model shape")
        rank = max(self.rank, lora.settings.rank)
        for block, own in zip(self.blocks, lora.blocks):
            block.append(own, rank)
        self.names.append(name)
        self.settings[name] = lora.settings
        self.scaling = torch.cat([self.scaling, self.scaling.new_tensor([lora.settings.scaling])])
        self._mask = None

    def remove(self, name: str) -> None:
        """Forget adapter `name`; the stacks shrink to the largest remaining rank."""
        index = self.index(name)
        if index == NO_ADAPTER:
            raise KeyError("the base is not an adapter")
        self.names.remove(name)
        del self.settings[name]
        rank = max((s.rank for s in self.settings.values()), default=0)
        adapted = {t for s in self.settings.values() for t in s.targets}
        for block in self.blocks:
            block.drop(index, rank, adapted)
        keep = [i for i in range(len(self.scaling)) if i != index]
        self.scaling = self.scaling[keep].clone()
        self._mask = None

    def index(self, name: str | None) -> int:
        """The row index of adapter `name` (None: the base alone); KeyError naming it if unknown."""
        if name is None:
            return NO_ADAPTER
        try:
            return 1 + self.names.index(name)
        except ValueError:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.names) or 'none'})") from None

    def set_rows(self, indices) -> None:
        """The adapter index of every batch row of the next forward passes (one int: the same
        for every row; None: the base for every row, whatever the batch)."""
        self.row_adapters = None if indices is None else torch.as_tensor(
            indices, dtype=torch.long, device=self.scaling.device)
        self._mask = None

    def row_mask(self, batch: int, dtype) -> torch.Tensor:
        """[batch, n rank] for the dense path: row b's scaling on its adapter's rank columns, zero
        on every other adapter's (and everywhere for the base). Built once per set_rows and
        shared by every block."""
        if self._mask is None or self._mask[:2] != (batch, dtype):
            rows = self.row_adapters.expand(batch) if self.row_adapters.dim() == 0 else self.row_adapters
            chosen = rows.unsqueeze(1) == torch.arange(1, len(self.scaling), device=rows.device)
            mask = (chosen * self.scaling[1:]).to(dtype).repeat_interleave(self.rank, dim=1)
            self._mask = (batch, dtype, mask)
        return self._mask[2]

    @contextlib.contextmanager
    def use(self, name: str | None):
        """Every forward inside runs adapter `name` (None: the base) on every row; the base after."""
        index = self.index(name)
        self.set_rows(index)
        try:
            yield
        finally:
            self.set_rows(None)

    def attach(self, model) -> MultiLoRA:
        if model.config.to_dict() != self.config.to_dict():
            raise LoraConfigError("adapters were built for a different model shape")
        for block, lora in zip(model.blocks, self.blocks):
            block.lora = lora
        return self


def _local_dims(config, tensor_parallel: int, target: str) -> tuple[int, int]:
    """(in, out) of this rank's shard of `target`: row-parallel layers split their input, the
    others their output."""
    fan_in, fan_out = target_dims(config, target)
    if target in ROW_PARALLEL:
        return fan_in // tensor_parallel, fan_out
    return fan_in, fan_out // tensor_parallel


def read_adapter(name: str, directory: str, model, ctx=None) -> LoraAdapters:
    """One PEFT adapter directory for `model` (this rank's shards); AdapterError naming it
    when it is missing or does not fit the base. The model's blocks keep whatever hook they had."""
    from .adapter_io import AdapterError, load_peft_adapter

    hooks = [block.lora for block in model.blocks]
    try:
        return load_peft_adapter(directory, model, ctx=ctx)
    except (AdapterError, LoraConfigError) as err:
        raise AdapterError(f"adapter {name!r} ({directory}) does not fit the base: {err}") from None
    finally:  # loading attaches the adapter alone; put the previous hooks back
        for block, hook in zip(model.blocks, hooks):
            block.lora = hook


def load_adapters(directories: dict[str, str], model, ctx=None) -> MultiLoRA:
    """PEFT adapter directories by name (none: an empty set, for adapters loaded later),
    stacked and attached to `model`; an adapter that does not fit the base raises AdapterError
    naming it."""
    loaded = {name: read_adapter(name, directory, model, ctx) for name, directory in directories.items()}
    return MultiLoRA(loaded, base=model).attach(model)
