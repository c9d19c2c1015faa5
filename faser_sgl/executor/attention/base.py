"""The attention backend interface: one ragged batch, paged KV with page size 1."""

from __future__ import annotations

from typing import Protocol

import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache


class AttentionBackend(Protocol):
    def begin_forward(self, batch: ForwardBatch) -> None:
        """Prepare per-pass state (masks, gather indices, kernel plans) once for all layers."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        """Write this pass's k/v ([T, kv_heads, d]) at batch.out_cache_loc, then attend.

        q: [T, heads, d].  New token j of request i sees the request's KV entries up to its own
        position (causal, aligned to the end of the request's KV).  Returns [T, heads, d].
        """
