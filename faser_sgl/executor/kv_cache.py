"""Paged KV cache with page size 1, and the allocator that hands out its slots.

A slot holds the K and V of one token in every layer.  Requests own lists of slots (any order,
not contiguous), so admitting, finishing, and rolling back rejected draft tokens are all just
slot-list operations on the host, with no copying of cache contents.
"""

from __future__ import annotations

from typing import Iterable

import torch

from faser_sgl.executor.config import ModelConfig


class KVCache:
    """Per layer, a K and a V buffer of shape [num_slots, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # Zero-filled, not empty: a slot that was never written must not hold NaN garbage, in
        # case a kernel ever multiplies a masked-out (zero-weight) entry by it.
        self.k = [torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=self.device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=self.device)
                  for _ in range(num_layers)]

    @staticmethod
    def for_model(config: ModelConfig, num_slots: int, dtype: torch.dtype,
                  device: str | torch.device) -> "KVCache":
        return KVCache(config.num_layers, num_slots, config.num_kv_heads, config.head_dim, dtype, device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([T, kv_heads, head_dim]) of T new tokens at slots ([T] int64)."""
        self.k[layer].index_copy_(0, slots, k.to(self.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.dtype))

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole K and V buffers of a layer, [num_slots, kv_heads, head_dim] each."""
        return self.k[layer], self.v[layer]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class SlotAllocator:
    """Free list over KV slots.

    All-or-nothing allocation.  ``free`` checks every slot before releasing any, so a double free
    or a stray slot (the signature of a leak or a bookkeeping bug elsewhere) raises and leaves the
    allocator unchanged.

    ``reclaimer`` (optional, e.g. a prefix cache) holds slots it can give back on demand: it has an
    ``evictable_size`` and an ``evict(n)`` that frees at least n slots where it can.  Slots it holds
    count as available, and ``alloc`` asks it to evict before refusing.
    """

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"a KV pool needs at least one slot, got {num_slots}")
        self.num_total = num_slots
        self.reclaimer = None
        self.reset()

    def reset(self) -> None:
        """Mark every slot free (for flush_cache when no request holds slots)."""
        # Reversed so that pop() hands out low slot numbers first: easier to read in logs.
        self._free = list(range(self.num_total - 1, -1, -1))
        self._in_use = bytearray(self.num_total)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    @property
    def num_available(self) -> int:
        """Free slots plus those the reclaimer could evict to satisfy an alloc."""
        return len(self._free) + (self.reclaimer.evictable_size if self.reclaimer is not None else 0)

    def can_alloc(self, n: int) -> bool:
        return 0 <= n <= self.num_available

    def alloc(self, n: int) -> list[int] | None:
        """n free slots, or None when fewer than n are free even after asking the reclaimer to
        evict (never a partial allocation)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        # Evict only when that will suffice: a refused alloc should not have emptied the cache.
        if len(self._free) < n <= self.num_available:
            self.reclaimer.evict(n - len(self._free))
        if n > len(self._free):
            return None
        slots = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        for s in slots:
            self._in_use[s] = 1
        return slots

    def free(self, slots: Iterable[int] | torch.Tensor) -> None:
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        slots = [int(s) for s in slots]
        seen = set()
        for s in slots:
            if not 0 <= s < self.num_total:
                raise ValueError(f"slot {s} is outside the KV pool [0, {self.num_total})")
            if not self._in_use[s] or s in seen:
                raise ValueError(f"slot {s} freed twice (or never allocated)")
            seen.add(s)
        for s in slots:
            self._in_use[s] = 0
        self._free.extend(reversed(slots))


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's K and V take across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * elem


def slots_for_budget(bytes_per_token: int, budget_bytes: int, max_slots: int | None = None,
                     min_slots: int = 1) -> int:
    """How many slots of bytes_per_token (kv_bytes_per_token, summed over the models that share
    the slot numbering) fit in budget_bytes, clamped to [min_slots, max_slots]."""
    n = int(budget_bytes) // bytes_per_token
    if max_slots is not None:
        n = min(n, max_slots)
    return max(n, min_slots)
