"""Several LoRA adapters over one frozen base in one batch, chosen per batch row.

Every block's `lora` hook (gptj/layers.py) is handed a `BlockMultiLoRA` instead of a single
adapter's `BlockLoRA`. The base matmul still runs once for the whole batch; the hook then adds,
for each row b, the delta of that row's adapter only:

    delta_b = (x_b A_{i_b}^T) * scaling_{i_b}  B_{i_b}^T          i_b = row_adapters[b]

The adapters' factors are stacked along a leading adapter axis and gathered per row by the
index tensor. Index 0 is "no adapter": its factors are zero, so such a row gets the base's
output. Ranks differ between adapters; every factor is zero-padded to the largest rank (the
padded rank columns multiply zeros, adding exactly nothing), and a target an adapter does not
adapt holds zeros for it.

The stacked factors are built from each adapter's `LoraAdapters` (gptj/lora.py), which already
hold this tensor-parallel rank's shards, so they split exactly as a single adapter does. The
base may be plain or quantized (int8 / int4): the hook only ever sees the layer's input and
output activations.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import ROW_PARALLEL, TARGETS, LoraAdapters, LoraConfigError

NO_ADAPTER = 0  # the row index of "the base alone"


class BlockMultiLoRA(nn.Module):
    """One block's stacked adapters: A [n + 1, rank, in_local] and B [n + 1, out_local, rank] per
    target, index 0 zero. `add` reads the rows' adapter indices from the owning `MultiLoRA`."""

    def __init__(self, owner: MultiLoRA, blocks: list, widths: dict[str, int], fans: dict[str, int],
                 rank: int, dtype, device):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (a cycle)
        self.widths = widths
        self.rank = rank
        count = len(blocks) + 1
        self.targets = tuple(t for t in TARGETS if any(t in b.pairs for b in blocks))
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for target in self.targets:
            a = torch.zeros(count, rank, fans[target], dtype=dtype, device=device)
            b = torch.zeros(count, widths[target], rank, dtype=dtype, device=device)
            for i, block in enumerate(blocks, start=1):
                if target in block.pairs:
                    pair = block.pairs[target]
                    r = pair.lora_A.shape[0]
                    a[i, :r] = pair.lora_A.detach().to(dtype)
                    b[i, :, :r] = pair.lora_B.detach().to(dtype)
            self.A[target] = nn.Parameter(a, requires_grad=False)
            self.B[target] = nn.Parameter(b, requires_grad=False)

    def add(self, targets: tuple[str, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the outputs of `targets` side by side, [B, S, sum of widths]) plus each row's own
        adapter's deltas from the common input x [B, S, in]."""
        present = [t for t in targets if t in self.A]
        if not present:
            return y
        rows = self._owner[0].row_adapters
        if rows is None:  # no rows chosen: every row is the base alone
            return y
        if rows.shape[0] != x.shape[0]:
            raise RuntimeError(f"MultiLoRA: set_rows must give one adapter index per batch row "
                               f"({x.shape[0]} rows, found {rows.shape[0]})")
        scale = self._owner[0].scaling[rows].to(x.dtype).view(-1, 1, 1)
        # Every present target's A of the row's adapter side by side: one batched matmul.
        a = torch.cat([self.A[t][rows] for t in present], dim=1)  # [B, k rank, in]
        low = torch.bmm(x, a.transpose(1, 2)) * scale  # [B, S, k rank]
        pieces = []
        i = 0
        for target in targets:
            if target in self.A:
                part = low[..., i * self.rank:(i + 1) * self.rank]
                pieces.append(torch.bmm(part, self.B[target][rows].transpose(1, 2)))
                i += 1
            else:
                pieces.append(y.new_zeros(*y.shape[:-1], self.widths[target]))
        delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return y + delta


class MultiLoRA(nn.Module):
    """Named adapters (each a `LoraAdapters` for the same base and parallel layout) stacked for
    per-row use. `attach(model)` hands every block its `BlockMultiLoRA`; before each forward,
    `set_rows(indices)` says which adapter every batch row uses (`index(name)`; 0 = none)."""

    def __init__(self, adapters: dict[str, LoraAdapters]):
        super().__init__()
        if not adapters:
            raise LoraConfigError("MultiLoRA needs at least one adapter")
        self.names = list(adapters)
        first = next(iter(adapters.values()))
        self.config = first.config
        for name, lora in adapters.items():
            if lora.config.to_dict() != self.config.to_dict():
                raise LoraConfigError(f"adapter {name!r} was built for a different model shape")
        param = next(first.parameters())
        dtype, device = param.dtype, param.device
        rank = max(lora.settings.rank for lora in adapters.values())
        self.register_buffer("scaling", torch.tensor(
            [0.0] + [lora.settings.scaling for lora in adapters.values()], dtype=torch.float32, device=device))
        self.row_adapters: torch.Tensor | None = None
        blocks = []
        for layer in range(self.config.num_layers):
            per_adapter = [lora.blocks[layer] for lora in adapters.values()]
            widths = per_adapter[0].widths
            fans = {t: _local_fan_in(self.config, first.ctx.tensor_parallel, t) for t in TARGETS}
            blocks.append(BlockMultiLoRA(self, per_adapter, widths, fans, rank, dtype, device))
        self.blocks = nn.ModuleList(blocks)

    def index(self, name: str | None) -> int:
        """The row index of adapter `name` (None: the base alone); KeyError naming it if unknown."""
        if name is None:
            return NO_ADAPTER
        try:
            return 1 + self.names.index(name)
        except ValueError:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.names)})") from None

    def set_rows(self, indices) -> None:
        """The adapter index of every batch row of the next forward passes (None: the base for
        every row, whatever the batch)."""
        self.row_adapters = None if indices is None else torch.as_tensor(
            indices, dtype=torch.long, device=self.scaling.device)

    def attach(self, model) -> MultiLoRA:
        if model.config.to_dict() != self.config.to_dict():
            raise LoraConfigError("adapters were built for a different model shape")
        for block, lora in zip(model.blocks, self.blocks):
            block.lora = lora
        return self


def _local_fan_in(config, tensor_parallel: int, target: str) -> int:
    d, f = config.hidden_size, config.ffn_dim
    fan_in = f if target == "fc_out" else d
    return fan_in // tensor_parallel if target in ROW_PARALLEL else fan_in


def load_adapters(directories: dict[str, str], model, ctx=None) -> MultiLoRA:
    """PEFT adapter directories by name, stacked and attached to `model`; an adapter that does
    not fit the base raises AdapterError naming it."""
    from .adapter_io import AdapterError, load_peft_adapter

    loaded = {}
    for name, directory in directories.items():
        try:
            loaded[name] = load_peft_adapter(directory, model, ctx=ctx)
        except (AdapterError, LoraConfigError) as err:
            raise AdapterError(f"adapter {name!r} ({directory}) does not fit the base: {err}") from None
    return MultiLoRA(loaded).attach(model)
