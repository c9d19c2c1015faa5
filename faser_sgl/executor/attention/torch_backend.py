"""Reference attention in plain torch: the CPU backend, and the yardstick for faster ones.

How the ragged batch is cut into SDPA calls (chosen by measuring on CPU, see the numbers below):

* Short query runs (decode, speculative verification: q_i <= SHORT_QUERY) are padded into
  batched SDPA calls.  GQA is handled by folding the query heads of each KV group into the query
  length, so K/V are never repeated per head: q [n, kv_heads, group * max_q, d] against
  k/v [n, kv_heads, max_kv, d].  Requests are sorted by KV length and cut into buckets whose
  padding waste stays bounded, so one long context does not pad every short one to its length.
* Long query runs (prefill chunks) get one SDPA call each; a chunk with no cached prefix uses
  SDPA's own causal mode and the fresh k/v directly, with no gather from the cache.

Measured on one CPU thread (12 heads / 2 KV heads / d=128, per layer): 32 decodes with KV
100..1000 took 31 ms looped one request at a time, 86 ms padded into one call, 36 ms bucketed;
8 verifications of 4 tokens with KV 50..300 took 4.1 ms looped, 3.1 ms padded, 2.9 ms bucketed.
Decode is bound by gathering each request's K/V out of the page-size-1 pool, not by arithmetic.
Every mask and gather index is built once per forward pass in ``begin_forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from faser_sgl.executor.attention.base import AttentionBackend
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache

# Query runs up to this long are padded and batched; longer ones run one SDPA call each.
SHORT_QUERY = 16
# A padded bucket may do at most this much more KV work than its requests really need.
MAX_PADDING_WASTE = 1.25


@dataclass
class _PaddedGroup:
    """Short-query requests padded to [n, max_q] queries over [n, max_kv] KV entries."""
    q_rows: torch.Tensor  # [n * max_q] row of q for each padded query (padding repeats a real row)
    kv_slots: torch.Tensor  # [n * max_kv] cache slot per KV entry (padding repeats a real slot)
    mask: torch.Tensor  # [n, 1, group * max_q, max_kv] additive: 0 = attend, -inf = not; rows (g, j)
    valid_rows: torch.Tensor  # [num_real] which of the n * max_q padded queries are real
    out_rows: torch.Tensor  # [num_real] output rows, in the order valid_rows selects them
    max_q: int
    max_kv: int


@dataclass
class _Single:
    """One long-query request: its own SDPA call."""
    q_start: int
    q_end: int
    kv_slots: torch.Tensor | None  # [kv] slots, or None when the request has no cached prefix
    mask: torch.Tensor | None  # [q, kv] end-aligned causal mask when there is a prefix


class TorchAttention(AttentionBackend):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(num_heads, num_kv_heads, head_dim)
        self.group = num_heads // num_kv_heads
        self._padded: list[_PaddedGroup] = []
        self._singles: list[_Single] = []

    # ----- per pass -----------------------------------------------------------------------

    def begin_forward(self, batch: ForwardBatch) -> None:
        qo = batch.qo_indptr.tolist()
        kv = batch.kv_indptr.tolist()
        short, self._singles = [], []
        for i in range(len(qo) - 1):
            q_len, kv_len = qo[i + 1] - qo[i], kv[i + 1] - kv[i]
            if q_len == 0:
                continue
            if q_len > kv_len:
                raise ValueError(f"request {i} has {q_len} new tokens but only {kv_len} KV entries")
            if q_len <= SHORT_QUERY:
                short.append((kv_len, i))
            else:
                self._singles.append(self._single(i, qo, kv, batch.kv_indices))
        self._padded = [self._padded_group(b, qo, kv, batch.kv_indices) for b in _buckets(short)]

    @staticmethod
    def _single(i: int, qo: list[int], kv: list[int], kv_indices: torch.Tensor) -> _Single:
        q_len, kv_len = qo[i + 1] - qo[i], kv[i + 1] - kv[i]
        if q_len == kv_len:  # fresh prefill: plain causal over its own new tokens
            return _Single(qo[i], qo[i + 1], None, None)
        device = kv_indices.device
        # Query j sits at position kv_len - q_len + j and sees KV entries 0 .. that position.
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        return _Single(qo[i], qo[i + 1], kv_indices[kv[i]:kv[i + 1]], mask)

    def _padded_group(self, reqs: list[int], qo: list[int], kv: list[int],
                      kv_indices: torch.Tensor) -> _PaddedGroup:
        device = kv_indices.device
        q_start = torch.tensor([qo[i] for i in reqs], device=device)
        q_len = torch.tensor([qo[i + 1] - qo[i] for i in reqs], device=device)
        kv_start = torch.tensor([kv[i] for i in reqs], device=device)
        kv_len = torch.tensor([kv[i + 1] - kv[i] for i in reqs], device=device)
        max_q, max_kv = int(q_len.max()), int(kv_len.max())
        j = torch.arange(max_q, device=device)
        p = torch.arange(max_kv, device=device)

        valid = j[None, :] < q_len[:, None]  # [n, max_q]
        # Padding points at real data (the request's first query row / first KV slot), so no
        # uninitialised value ever enters the computation, even with a zero weight.
        q_rows = q_start[:, None] + torch.where(valid, j[None, :], 0)
        kv_pos = torch.where(p[None, :] < kv_len[:, None], p[None, :], 0)
        kv_slots = kv_indices[kv_start[:, None] + kv_pos]

        query_pos = (kv_len - q_len)[:, None] + j[None, :]  # [n, max_q] absolute positions
        mask = p[None, None, :] <= query_pos[:, :, None]  # [n, max_q, max_kv]; implies p < kv_len
        mask[:, :, 0] |= ~valid  # padded queries attend to something instead of producing NaN
        mask = mask.repeat(1, self.group, 1)[:, None]  # fold: row g * max_q + j
        # An additive float mask: SDPA's CPU kernel runs faster with it than with a bool one.
        additive = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, float("-inf"))
        return _PaddedGroup(q_rows.reshape(-1), kv_slots.reshape(-1), additive,
                            valid.reshape(-1).nonzero().squeeze(1), q_rows[valid], max_q, max_kv)

    # ----- per layer ----------------------------------------------------------------------

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        kv_cache.write(layer_id, batch.out_cache_loc, k, v)
        k_all, v_all = kv_cache.get(layer_id)
        out = torch.empty_like(q)
        for g in self._padded:
            out.index_copy_(0, g.out_rows, self._attend_padded(g, q, k_all, v_all))
        for s in self._singles:
            out[s.q_start:s.q_end] = self._attend_single(s, q, k, v, k_all, v_all)
        return out

    def _attend_padded(self, g: _PaddedGroup, q, k_all, v_all) -> torch.Tensor:
        max_q, max_kv = g.max_q, g.max_kv
        n = g.q_rows.numel() // max_q
        kvh, grp, d = self.num_kv_heads, self.group, self.head_dim
        # Gathers by index_select: 2.5-4x faster than advanced indexing on a CPU (measured).
        # [n, max_q, heads, d] -> [n, kv_heads, group * max_q, d]; head h = kv_head * group + g.
        qg = q.index_select(0, g.q_rows).view(n, max_q, kvh, grp, d).permute(0, 2, 3, 1, 4) \
            .reshape(n, kvh, grp * max_q, d)
        kg = k_all.index_select(0, g.kv_slots).view(n, max_kv, kvh, d).to(q.dtype).transpose(1, 2)
        vg = v_all.index_select(0, g.kv_slots).view(n, max_kv, kvh, d).to(q.dtype).transpose(1, 2)
        if g.mask.dtype != q.dtype:  # once per pass, not per layer
            g.mask = g.mask.to(q.dtype)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=self.scale)
        o = o.view(n, kvh, grp, max_q, d).permute(0, 3, 1, 2, 4).reshape(n * max_q, kvh * grp, d)
        return o.index_select(0, g.valid_rows)

    def _attend_single(self, s: _Single, q, k, v, k_all, v_all) -> torch.Tensor:
        qs = q[s.q_start:s.q_end].transpose(0, 1)[None]  # [1, heads, q, d]
        gqa = self.group > 1
        if s.kv_slots is None:
            ks = k[s.q_start:s.q_end].transpose(0, 1)[None]
            vs = v[s.q_start:s.q_end].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            ks = k_all[s.kv_slots].to(q.dtype).transpose(0, 1)[None]
            vs = v_all[s.kv_slots].to(q.dtype).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=s.mask, scale=self.scale, enable_gqa=gqa)
        return o[0].transpose(0, 1)


def _buckets(reqs: list[tuple[int, int]]) -> list[list[int]]:
    """Cut (kv_len, request) pairs into buckets sorted by KV length such that each bucket's
    padded KV work (size * longest) stays within MAX_PADDING_WASTE of its real work."""
    buckets: list[list[int]] = []
    current: list[int] = []
    total = 0
    for kv_len, i in sorted(reqs):
        # Sorted ascending, so kv_len is the bucket's longest if the request joins it.
        if current and (len(current) + 1) * kv_len > MAX_PADDING_WASTE * (total + kv_len):
            buckets.append(current)
            current, total = [], 0
        current.append(i)
        total += kv_len
    if current:
        buckets.append(current)
    return buckets
