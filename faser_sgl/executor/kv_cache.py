"""Paged KV cache with page size 1 and the slot allocator that hands out its slots."""

from __future__ import annotations

import torch


class KVCache:
    """Per layer, K and V buffers of shape [num_slots, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device):
        self.num_slots = num_slots
        self.k = [torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v[layer].dtype))


class SlotAllocator:
    """Free list over KV slots.  All-or-nothing allocation; freeing checks ownership so that a
    double free or a stray slot (the signature of a leak elsewhere) fails loudly."""

    def __init__(self, num_slots: int):
        self.num_total = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self._used = bytearray(num_slots)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > len(self._free):
            return None
        slots = [self._free.pop() for _ in range(n)]
        for s in slots:
            self._used[s] = 1
        return slots

    def free(self, slots) -> None:
        for s in slots:
            if not 0 <= s < self.num_total:
                raise ValueError(f"slot {s} is outside the pool of {self.num_total}")
            if not self._used[s]:
                raise ValueError(f"slot {s} freed twice")
            self._used[s] = 0
        self._free.extend(reversed(list(slots)))


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
