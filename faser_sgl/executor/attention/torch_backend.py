"""Reference attention in plain torch (CPU or any device).

Requests with short query runs (decode, speculative verification) are padded into one batched
SDPA call per layer; long prefill chunks run one SDPA call each, so a long prompt never pads a
whole batch of decodes to its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache

# Query runs up to this long are batched together with padding.
SHORT_QUERY = 16


@dataclass
class _Group:
    token_rows: torch.Tensor  # [n, max_q] rows of q in the batch (padding points at row 0)
    kv_slots: torch.Tensor  # [n, max_kv] KV slots (padding points at slot 0)
    mask: torch.Tensor  # [n, 1, max_q, max_kv] True = attend
    valid: torch.Tensor  # [n, max_q] which padded query positions are real
    out_rows: torch.Tensor  # [num_real] rows of the output these queries fill


class TorchAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim ** -0.5
        self.groups: list[_Group] = []

    def begin_forward(self, batch: ForwardBatch) -> None:
        qo = batch.qo_indptr.tolist()
        kv = batch.kv_indptr.tolist()
        device = batch.input_ids.device
        short, long = [], []
        for i in range(len(qo) - 1):
            q_len = qo[i + 1] - qo[i]
            if q_len == 0:
                continue
            (short if q_len <= SHORT_QUERY else long).append(i)
        self.groups = []
        if short:
            self.groups.append(self._group(short, qo, kv, batch.kv_indices, device))
        for i in long:
            self.groups.append(self._group([i], qo, kv, batch.kv_indices, device))

    @staticmethod
    def _group(reqs, qo, kv, kv_indices, device) -> _Group:
        q_lens = [qo[i + 1] - qo[i] for i in reqs]
        kv_lens = [kv[i + 1] - kv[i] for i in reqs]
        n, max_q, max_kv = len(reqs), max(q_lens), max(kv_lens)
        q_pos = torch.arange(max_q, device=device)
        kv_pos = torch.arange(max_kv, device=device)
        q_len_t = torch.tensor(q_lens, device=device)
        kv_len_t = torch.tensor(kv_lens, device=device)
        valid = q_pos[None, :] < q_len_t[:, None]
        # Query j of a request sits at absolute position kv_len - q_len + j.
        abs_pos = (kv_len_t - q_len_t)[:, None] + q_pos[None, :]
        mask = kv_pos[None, None, :] <= abs_pos[:, :, None]
        mask &= kv_pos[None, None, :] < kv_len_t[:, None, None]
        mask[:, :, 0] |= ~valid  # padded queries attend somewhere harmless instead of NaN
        starts_q = torch.tensor([qo[i] for i in reqs], device=device)
        starts_kv = torch.tensor([kv[i] for i in reqs], device=device)
        token_rows = torch.where(valid, starts_q[:, None] + q_pos[None, :], 0)
        kv_valid = kv_pos[None, :] < kv_len_t[:, None]
        kv_slots = torch.where(kv_valid, kv_indices[(starts_kv[:, None] + kv_pos[None, :]).clamp(
            max=kv_indices.numel() - 1)], 0)
        return _Group(token_rows, kv_slots, mask[:, None], valid, token_rows[valid])

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        kv_cache.write(layer, batch.out_cache_loc, k, v)
        k_all, v_all = kv_cache.k[layer], kv_cache.v[layer]
        out = torch.empty_like(q)
        for g in self.groups:
            qg = q[g.token_rows].transpose(1, 2)  # [n, heads, max_q, d]
            kg = k_all[g.kv_slots].transpose(1, 2).to(q.dtype)  # [n, kv_heads, max_kv, d]
            vg = v_all[g.kv_slots].transpose(1, 2).to(q.dtype)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=self.scale,
                                               enable_gqa=self.num_heads != self.num_kv_heads)
            out[g.out_rows] = o.transpose(1, 2)[g.valid]
        return out
