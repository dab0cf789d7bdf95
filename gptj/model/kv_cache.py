"""A static key/value cache: preallocated per layer, one row per sequence, per-row lengths.

Layout per layer: keys and values [B, H_local, T, D] (H_local = this rank's heads, so the
cache is sharded by heads exactly like attention). Slot j of row b holds the token at
position j of that row's sequence: no left padding, so a row can be refilled with a new
prompt (continuous batching) without touching the other rows.

The model reaches the cache through `cache.layer(i).update(k, v)`. What `update` does depends
on the phase the caller set before the forward pass:

- `prefill(rows, length)`: k/v [n, H, S, D] of fresh prompts are written into slots 0..S-1
  of `rows`; attention then runs over these new keys only (the caller's mask is [n,1,S,S]).
- `extend(rows, starts, ends)`: the rest of prompts whose first `starts[i]` slots already hold
  their keys (copied in from a prefix cache, `write_blocks`): k/v [n, H, S, D] (right-padded)
  are written into slots starts[i]..ends[i]-1 of `rows`; attention then runs over slots
  0..max(ends)-1 of those rows (the caller's mask is [n,1,S,max(ends)]).
- `decode(positions, window)`: k/v [B, H, 1, D] are written at slot `positions[b]` of every
  row; attention runs over slots 0..window-1 of every row (the caller's mask is
  [B,1,1,window] and hides unused slots). A fixed `window` = T keeps every shape static,
  which compiled / graph-captured decode steps need.

The decode mask lives here too (`decode_mask`, bool [B,1,1,T]) and is updated in place: one
slot per row per step, never rebuilt.
"""

from __future__ import annotations

import functools

import torch


class _LayerCache:
    __slots__ = ("owner", "keys", "values")

    def __init__(self, owner: StaticKVCache, keys: torch.Tensor, values: torch.Tensor):
        self.owner, self.keys, self.values = owner, keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self.owner
        if owner.phase == "decode":
            # index_put_ rather than scatter_: the same write, but bf16 scatter_ is far slower
            # on CPU (NOTES.md, "Numbers behind code comments").
            index = owner.write_index  # (row, head, slot), each [B, H], shared by every layer
            self.keys.index_put_(index, k[:, :, 0].to(self.keys.dtype))
            self.values.index_put_(index, v[:, :, 0].to(self.values.dtype))
            window = owner.window
            if window == self.keys.shape[2]:
                return self.keys, self.values
            return self.keys[:, :, :window], self.values[:, :, :window]
        if owner.phase == "prefill":
            length = k.shape[2]
            rows = owner.rows
            cached_k, cached_v = k.to(self.keys.dtype), v.to(self.values.dtype)
            if rows is None:
                self.keys[:, :, :length] = cached_k
                self.values[:, :, :length] = cached_v
            else:
                self.keys[rows, :, :length] = cached_k
                self.values[rows, :, :length] = cached_v
            return k, v
        if owner.phase == "extend":
            rows, slots, batch, offset = owner.extend_index  # one entry per real (not padding) token
            self.keys[rows, :, slots] = k[batch, :, offset].to(self.keys.dtype)
            self.values[rows, :, slots] = v[batch, :, offset].to(self.values.dtype)
            seen, end = owner.rows, owner.window
            return self.keys[seen, :, :end], self.values[seen, :, :end]
        raise RuntimeError("KV cache used outside prefill()/decode(): set the phase first")


def cache_dtype(activation_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype keys and values are cached in: the activations' own, except bf16 / fp16 on a
    CPU where torch's attention has no native bf16 path, cached in fp32. There a one-token query
    over a bf16 cache with a mask is several times slower than over fp32 (NOTES.md, "Serving"); the
    cached values are the bf16 ones, exactly, and the attention computes in fp32 either way, at
    twice the cache memory. With AMX tiles the bf16 cache is the faster one (at GPT-J 6B's and
    bench-small's head shapes, NOTES.md) and half the memory."""
    if device.type != "cpu" or activation_dtype not in (torch.bfloat16, torch.float16):
        return activation_dtype
    if activation_dtype == torch.bfloat16 and native_bf16_attention():
        return torch.bfloat16
    return torch.float32


@functools.cache
def native_bf16_attention() -> bool:
    """Whether torch's CPU attention runs bf16 on this CPU's AMX tiles (torch's own check)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except (RuntimeError, AttributeError):
        return False


def model_cache_dtype(model, dtype: torch.dtype | None = None, device=None) -> torch.dtype:
    """`dtype`, or when None `cache_dtype`'s choice for the model's activations on `device`
    (default: where the model's weights are)."""
    return dtype or cache_dtype(model.dtype, torch.device(device or model.device))


def kv_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Bytes one token takes in this rank's KV cache of `model`: keys and values of every layer,
    in `model_cache_dtype(model, dtype)`."""
    attn = model.blocks[0].attn
    return token_bytes(len(model.blocks), attn.local_heads * attn.head_dim, model_cache_dtype(model, dtype))


def token_bytes(num_layers: int, width: int, dtype: torch.dtype) -> int:
    """Keys and values of one token across `num_layers` layers of `width` channels each."""
    return 2 * num_layers * width * dtype.itemsize


class StaticKVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, num_heads, max_length, head_dim)
        self.batch_size, self.max_length = batch_size, max_length
        self.layers = [
            _LayerCache(self, torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.decode_mask = torch.zeros(batch_size, 1, 1, max_length, dtype=torch.bool, device=device)
        self._index_rows(batch_size, num_heads, torch.device(device or "cpu"))
        self.phase: str | None = None
        self.rows: torch.Tensor | slice | None = None
        self.window = max_length
        self.extend_index: tuple[torch.Tensor, ...] = ()

    def _index_rows(self, batch_size: int, num_heads: int, device: torch.device) -> None:
        rows = torch.arange(batch_size, device=device)[:, None].expand(batch_size, num_heads)
        heads = torch.arange(num_heads, device=device)[None, :].expand(batch_size, num_heads)
        self._slots = torch.zeros(batch_size, num_heads, dtype=torch.long, device=device)
        self.write_index = (rows, heads, self._slots)

    def resize(self, batch_size: int, max_length: int) -> StaticKVCache:
        """Hold `batch_size` rows of `max_length` slots, keeping what the rows and slots that
        remain hold (their mask included). Layer by layer, so the memory held on the way is
        the larger of the two caches plus one layer. Views (`leading_rows`) of the old cache
        no longer share this one's memory."""
        keep_rows, keep_slots = min(batch_size, self.batch_size), min(max_length, self.max_length)

        def moved(old: torch.Tensor, shape: tuple) -> torch.Tensor:
            new = old.new_zeros(shape)
            new[:keep_rows, ..., :keep_slots, :] = old[:keep_rows, ..., :keep_slots, :]
            return new

        heads, dim = self.layers[0].keys.shape[1], self.layers[0].keys.shape[3]
        shape = (batch_size, heads, max_length, dim)
        for layer in self.layers:
            layer.keys = moved(layer.keys, shape)
            layer.values = moved(layer.values, shape)
        mask = self.decode_mask.new_zeros(batch_size, 1, 1, max_length)
        mask[:keep_rows, ..., :keep_slots] = self.decode_mask[:keep_rows, ..., :keep_slots]
        self.decode_mask = mask
        self._index_rows(batch_size, heads, mask.device)
        self.batch_size, self.max_length, self.window = batch_size, max_length, max_length
        return self

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int, dtype=None, device=None) -> StaticKVCache:
        """A cache shaped for this rank's heads of `model`, in `cache_dtype` unless told."""
        attn = model.blocks[0].attn
        device = torch.device(device or model.device)
        return cls(
            len(model.blocks), batch_size, attn.local_heads, attn.head_dim, max_length,
            dtype=model_cache_dtype(model, dtype, device), device=device,
        )

    def leading_rows(self, n: int) -> StaticKVCache:
        """A cache over rows 0..n-1 that shares this cache's memory.

        A decode step over the first n rows only (the others idle) costs n rows, not B;
        whatever it writes lands in this cache.
        """
        if n == self.batch_size:
            return self
        if not 0 < n <= self.batch_size:
            raise ValueError(f"leading_rows needs 1 <= n <= {self.batch_size}, got {n}")
        view = StaticKVCache.__new__(StaticKVCache)
        view.batch_size, view.max_length = n, self.max_length
        view.layers = [_LayerCache(view, layer.keys[:n], layer.values[:n]) for layer in self.layers]
        view.decode_mask = self.decode_mask[:n]
        rows, heads, slots = (index[:n] for index in self.write_index)
        view._slots = slots.clone()
        view.write_index = (rows, heads, view._slots)
        view.phase, view.rows, view.window, view.extend_index = None, None, self.max_length, ()
        return view

    def mark_static_addresses(self) -> StaticKVCache:
        """Tell torch.compile that every tensor here keeps its address across decode steps.

        A compiled step writes the keys/values in place (`index_put_`); inductor captures a
        CUDA graph over mutated inputs only when they are static (as module parameters are),
        and otherwise skips the graph ("mutated inputs"). Static inputs are also read in place
        by the graph instead of being copied in on every replay (the mask, the write index).
        """
        from torch._dynamo import mark_static_address as mark

        for layer in self.layers:
            mark(layer.keys, guard=False)
            mark(layer.values, guard=False)
        for t in (self.decode_mask, *self.write_index):
            mark(t, guard=False)
        return self

    def layer(self, i: int) -> _LayerCache:
        return self.layers[i]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

    # ---- phases --------------------------------------------------------------------------------
    def prefill(self, rows: torch.Tensor | None, lengths: torch.Tensor) -> None:
        """Next forward writes fresh prompts into `rows` (None = all rows, in order).

        Marks slots 0..lengths[i]-1 of each of those rows as visible to later decode steps and
        hides the rest of the row (left over from an earlier sequence).
        """
        self.phase, self.rows = "prefill", rows
        slots = torch.arange(self.max_length, device=self.decode_mask.device)
        visible = (slots[None, :] < lengths[:, None]).view(-1, 1, 1, self.max_length)
        if rows is None:
            self.decode_mask.copy_(visible)
        else:
            self.decode_mask[rows] = visible

    def extend(self, rows: list[int], starts: list[int], ends: list[int]) -> None:
        """Next forward writes the tokens at slots starts[i]..ends[i]-1 of `rows` (fed as one
        right-padded batch, row i's first fed token at slot starts[i]) and attends slots
        0..max(ends)-1 of those rows. Slots below starts[i] must already hold the row's earlier
        tokens (`write_blocks`). Marks slots 0..ends[i]-1 visible to later decode steps."""
        device = self.decode_mask.device
        self.phase, self.window = "extend", max(ends)
        n = len(rows)
        contiguous = rows == list(range(rows[0], rows[0] + n))
        row_ids = torch.tensor(rows, device=device)
        self.rows = slice(rows[0], rows[0] + n) if contiguous else row_ids
        starts_t, ends_t = torch.tensor(starts, device=device), torch.tensor(ends, device=device)
        batch = torch.repeat_interleave(torch.arange(n, device=device), ends_t - starts_t)
        offset = torch.cat([torch.arange(e - s, device=device) for s, e in zip(starts, ends)])
        self.extend_index = (row_ids[batch], starts_t[batch] + offset, batch, offset)
        slots = torch.arange(self.max_length, device=device)
        self.decode_mask[row_ids] = (slots[None, :] < ends_t[:, None]).view(n, 1, 1, self.max_length)

    # ---- whole blocks of slots, for a prefix cache (gptj/execution/inference/prefix_cache.py) ----
    def read_block(self, row: int, start: int, size: int) -> torch.Tensor:
        """A copy of slots start..start+size-1 of `row`: [2 * layers, heads, size, head_dim], layer
        l's keys at 2l and its values at 2l + 1."""
        return torch.stack([t[row, :, start:start + size] for layer in self.layers for t in (layer.keys, layer.values)])

    def write_blocks(self, row: int, blocks: list[torch.Tensor]) -> None:
        """Slots 0.. of `row` from consecutive blocks in `read_block`'s layout (block by block: no
        temporary as large as the prompt's KV)."""
        start = 0
        for block in blocks:
            size = block.shape[2]
            for i, layer in enumerate(self.layers):
                layer.keys[row, :, start:start + size].copy_(block[2 * i])
                layer.values[row, :, start:start + size].copy_(block[2 * i + 1])
            start += size

    def decode(self, positions: torch.Tensor, window: int | None = None) -> None:
        """Next forward writes one token per row at slot positions[b] and attends slots < window."""
        self.phase, self.rows = "decode", None
        self.window = self.max_length if window is None else window
        self._slots.copy_(positions.view(-1, 1).expand_as(self._slots))
        self.decode_mask.scatter_(3, positions.view(-1, 1, 1, 1), True)

    def decode_mask_window(self) -> torch.Tensor:
        if self.window == self.max_length:
            return self.decode_mask
        return self.decode_mask[..., : self.window]
