"""Automatic prefix caching: the KV of full prompt blocks, kept for the next prompt that starts the same way.

A prompt is cut into blocks of `block_size` tokens. Block j is keyed by a hash of every token
up to its end (a chain: the key of block j - 1, then block j's tokens) and of the LoRA adapter
that computed it, so a key names one exact prefix under one set of weights: two adapters never
share a block, and a block is only found by a prompt that starts with all the tokens before it.
Only full blocks are kept; a prompt that ends mid-block reuses the full blocks before that.

Each block holds its tokens' keys and values of every layer, this rank's heads only
([2 * layers, heads, block_size, head_dim]: layer l's keys at 2l, its values at 2l + 1).
The request engine copies a hit's blocks into the request's own cache row and prefills the
rest of the prompt after them (gptj/execution/inference/request_engine.py); the row cache is
contiguous per row (the decode step attends slots 0..window of each row), so blocks are
copied in rather than referenced.

Eviction is least recently used under a byte limit the engine sets before every store (the
server's KV budget less what the row cache holds). A chain is touched from its last block to
its first, so the first block of a prefix is always more recent than the blocks after it:
eviction takes the tails of old prefixes before their heads, and a head shared by many
prompts stays.

Tensor parallel: every rank makes the same calls with the same limits in blocks, and the hash
is computed from token ids and the adapter's name alone (blake2b, not Python's per-process
`hash` of a string), so every rank holds the same keys, each with its own shard of the KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

DEFAULT_BLOCK_SIZE = 16


class PrefixCache:
    """Blocks of prompt KV by prefix hash, least recently used first.

    max_bytes: a fixed ceiling (None: only the limit the engine passes to `store`).
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, max_bytes: int | None = None):
        if block_size < 1:
            raise ValueError(f"prefix cache block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._adapter_of: dict[bytes, str | None] = {}
        self.nbytes = 0
        # Since creation: prompt tokens of the requests admitted, and those whose KV was reused.
        self.prompt_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    # ---- keys ----------------------------------------------------------------------------------
    def block_keys(self, tokens: list[int], adapter: str | None) -> list[bytes]:
        """The key of every full block of `tokens` under `adapter`, in order."""
        size = self.block_size
        previous = hashlib.blake2b(b"adapter\0" + (b"" if adapter is None else b"\1" + adapter.encode()),
                                   digest_size=16).digest()
        keys = []
        for end in range(size, len(tokens) + 1, size):
            block = array("q", tokens[end - size:end]).tobytes()
            previous = hashlib.blake2b(previous + block, digest_size=16).digest()
            keys.append(previous)
        return keys

    # ---- lookups -------------------------------------------------------------------------------
    def match(self, keys: list[bytes]) -> int:
        """How many leading blocks of a prompt with these keys are held (no side effects)."""
        count = 0
        for key in keys:
            if key not in self._blocks:
                break
            count += 1
        return count

    def passes(self, keys: list[list[bytes]], looks_up: list[bool] | None = None):
        """The prompts with these keys in passes (lists of indices, yielded in turn): a prompt
        that shares more leading blocks with an earlier prompt of the same pass than the pool
        holds waits for the next pass, when the caller has run and stored that one. Prompts
        with `looks_up[i]` False never wait."""
        pending = list(range(len(keys)))
        while pending:
            now, later, promised = [], [], set()
            for i in pending:
                if (looks_up is None or looks_up[i]) and self._leading(keys[i], promised) > self.match(keys[i]):
                    later.append(i)
                else:
                    now.append(i)
                    promised.update(keys[i])
            yield now
            pending = later

    def _leading(self, keys: list[bytes], promised: set[bytes]) -> int:
        """Leading blocks of these keys held or about to be stored (`promised`)."""
        count = 0
        for key in keys:
            if key not in self._blocks and key not in promised:
                break
            count += 1
        return count

    def take(self, keys: list[bytes]) -> list[torch.Tensor]:
        """The held leading blocks of these keys, marked as just used."""
        blocks = [self._blocks[key] for key in keys[: self.match(keys)]]
        self._touch(keys[: len(blocks)])
        return blocks

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the head last: the most recent of its chain
            self._blocks.move_to_end(key)

    # ---- stores --------------------------------------------------------------------------------
    def store(self, keys: list[bytes], adapter: str | None, read_block, limit: int | None = None) -> int:
        """Hold the blocks of one prompt (keys in order): those not held yet are read with
        `read_block(j)` (block j's tensor, copied from the prompt's cache row). Blocks of other
        prompts are evicted, least recently used first, to keep within the byte limit
        (min(`limit`, max_bytes)); when even this prompt's blocks do not all fit, only its leading
        ones are kept (a tail without its head is never found). Returns the blocks added."""
        ceiling = min(x for x in (limit, self.max_bytes, 1 << 62) if x is not None)
        added, protected = 0, set(keys)
        for j, key in enumerate(keys):
            if key in self._blocks:
                continue
            block = read_block(j)
            size = block.numel() * block.element_size()
            if not self._make_room(size, ceiling, protected):
                break
            self._blocks[key] = block
            self._adapter_of[key] = adapter
            self.nbytes += size
            added += 1
        self._touch([key for key in keys if key in self._blocks])
        return added

    def _make_room(self, size: int, ceiling: int, protected: set[bytes]) -> bool:
        if size > ceiling:
            return False
        while self.nbytes + size > ceiling:
            # The prompt being stored was touched last, so the scan stops early.
            victim = next((key for key in self._blocks if key not in protected), None)
            if victim is None:
                return False
            self._drop(victim)
        return True

    def shrink_to(self, limit: int) -> None:
        """Evict least recently used blocks until at most `limit` bytes are held."""
        while self.nbytes > max(0, limit) and self._blocks:
            self._drop(next(iter(self._blocks)))

    def drop_adapter(self, adapter: str | None) -> None:
        """Forget every block computed under `adapter` (its weights change or go)."""
        for key in [k for k, name in self._adapter_of.items() if name == adapter]:
            self._drop(key)

    def clear(self) -> None:
        self._blocks.clear()
        self._adapter_of.clear()
        self.nbytes = 0

    def _drop(self, key: bytes) -> None:
        block = self._blocks.pop(key)
        del self._adapter_of[key]
        self.nbytes -= block.numel() * block.element_size()
