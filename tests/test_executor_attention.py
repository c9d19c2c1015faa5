"""The torch attention backend against a naive per-request reference on ragged batches, and a
shared helper for backend comparisons (the flashinfer test reuses it on CUDA)."""

from __future__ import annotations

import random

import pytest
import torch

from faser_sgl.executor.attention import create_backend
from faser_sgl.executor.attention.torch_backend import SHORT_QUERY
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache

# (new tokens, cached prefix) per request: decodes of very different context lengths (several
# padding buckets), verification chunks, the short/long boundary, a fresh prefill, a chunked
# prefill continuation, and a request with no logits-worthy role at all but KV to write.
SHAPES = [(1, 40), (4, 12), (1, 3), (SHORT_QUERY, 5), (SHORT_QUERY + 1, 0), (30, 25), (1, 0),
          (2, 90), (1, 41), (7, 0)]


def ragged_case(num_heads, num_kv_heads, head_dim, dtype, device, seed=0, num_slots=600, num_layers=1):
    """A random batch over a cache whose layer 0 holds the prefixes: (batch, q, k, v, cache)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cache = KVCache(num_layers, num_slots, num_kv_heads, head_dim, dtype, device)
    free = list(range(num_slots))
    rng.shuffle(free)
    new_tokens, kv_slots = [], []
    for q_len, prefix in SHAPES:
        slots = [free.pop() for _ in range(q_len + prefix)]
        # The prefix was written by earlier passes.
        pre = torch.tensor(slots[:prefix], dtype=torch.int64, device=device)
        cache.write(0, pre, torch.randn(prefix, num_kv_heads, head_dim, generator=g).to(device),
                    torch.randn(prefix, num_kv_heads, head_dim, generator=g).to(device))
        new_tokens.append([0] * q_len)
        kv_slots.append(slots)
    batch = ForwardBatch.build(new_tokens, kv_slots, [[] for _ in SHAPES]).to(device)
    t = batch.num_tokens

    def rand(h):
        return torch.randn(t, h, head_dim, generator=g).to(device=device, dtype=dtype)

    return batch, rand(num_heads), rand(num_kv_heads), rand(num_kv_heads), cache


def naive_attention(q, cache_k, cache_v, batch: ForwardBatch) -> torch.Tensor:
    """Per request, per query: softmax over the visible KV entries, in float64."""
    heads, kv_heads, d = q.shape[1], cache_k.shape[1], q.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    qo, kv = batch.qo_indptr.tolist(), batch.kv_indptr.tolist()
    for i in range(batch.batch_size):
        slots = batch.kv_indices[kv[i]:kv[i + 1]]
        k = cache_k[slots].double().repeat_interleave(heads // kv_heads, dim=1)  # [kv, heads, d]
        v = cache_v[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        q_len, kv_len = qo[i + 1] - qo[i], kv[i + 1] - kv[i]
        for j in range(q_len):
            visible = kv_len - q_len + j + 1
            qj = q[qo[i] + j].double()  # [heads, d]
            scores = torch.einsum("hd,khd->hk", qj, k[:visible]) / d ** 0.5
            out[qo[i] + j] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[:visible])
    return out


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (8, 2)])
def test_torch_backend_matches_naive(heads, kv_heads):
    d = 16
    batch, q, k, v, cache = ragged_case(heads, kv_heads, d, torch.float32, "cpu")
    attn = create_backend("torch", heads, kv_heads, d)
    attn.begin_forward(batch)
    out = attn.forward(0, q, k, v, cache, batch)
    # The new K/V landed at out_cache_loc.
    assert torch.equal(cache.k[0][batch.out_cache_loc], k)
    assert torch.equal(cache.v[0][batch.out_cache_loc], v)
    want = naive_attention(q, cache.k[0], cache.v[0], batch)
    assert (out.double() - want).abs().max().item() < 1e-5


def test_plan_is_reused_across_layers():
    batch, q, k, v, cache = ragged_case(4, 2, 16, torch.float32, "cpu", num_layers=2)
    attn = create_backend("torch", 4, 2, 16)
    attn.begin_forward(batch)
    out0 = attn.forward(0, q, k, v, cache, batch)
    out1 = attn.forward(1, q, k, v, cache, batch)
    # Same inputs, and layer 1's cache holds only this pass's K/V (its prefix slots are zero):
    # the outputs differ exactly where requests have a cached prefix.
    no_prefix = torch.zeros(batch.num_tokens, dtype=torch.bool)
    row = 0
    for q_len, prefix in SHAPES:
        no_prefix[row:row + q_len] = prefix == 0
        row += q_len
    assert torch.allclose(out0[no_prefix], out1[no_prefix], atol=1e-6)
    assert not torch.allclose(out0[~no_prefix], out1[~no_prefix], atol=1e-3)


def test_unknown_backend_and_bad_heads():
    with pytest.raises(ValueError, match="unknown attention backend"):
        create_backend("xformers", 4, 2, 16)
    with pytest.raises(ValueError, match="KV groups"):
        create_backend("torch", 6, 4, 16)
