"""The attention backend interface: one ragged batch over a paged KV cache with page size 1."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache


class AttentionBackend(ABC):
    """Computes attention for every layer of one forward pass.

    Call order per pass: ``begin_forward(batch)`` once, then ``forward(layer_id, ...)`` once per
    layer.  Everything that depends only on the batch layout (masks, gather indices, kernel plans)
    belongs in begin_forward, so that its cost is paid once and not once per layer.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV groups")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    @abstractmethod
    def begin_forward(self, batch: ForwardBatch) -> None:
        """Prepare per-pass state for this batch's layout."""

    @abstractmethod
    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        """Write k/v ([T, kv_heads, d]) at batch.out_cache_loc, then attend.

        q is [T, heads, d].  New token j of request i (q_i new tokens, kv_i KV entries including
        them) attends to the request's KV entries 0 .. kv_i - q_i + j: causal, aligned to the end
        of the request's KV.  Scale 1/sqrt(d).  Returns [T, heads, d] in q's dtype.
        """
