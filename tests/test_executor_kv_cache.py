"""SlotAllocator accounting and leak detection; KVCache writes; pool sizing helpers."""

from __future__ import annotations

import pytest
import torch

from faser_sgl.executor.config import ModelConfig
from faser_sgl.executor.kv_cache import KVCache, SlotAllocator, kv_bytes_per_token, slots_for_budget


def test_alloc_free_accounting():
    a = SlotAllocator(10)
    assert (a.num_total, a.num_free, a.num_used) == (10, 10, 0)
    x = a.alloc(4)
    y = a.alloc(3)
    assert len(x) == 4 and len(y) == 3 and not set(x) & set(y)
    assert set(x) | set(y) <= set(range(10))
    assert (a.num_free, a.num_used) == (3, 7)
    a.free(x)
    assert (a.num_free, a.num_used) == (7, 3)
    z = a.alloc(7)
    assert sorted(z + y) == list(range(10)) and a.num_free == 0
    assert a.alloc(0) == []


def test_no_partial_allocation():
    a = SlotAllocator(5)
    a.alloc(3)
    assert a.alloc(3) is None
    assert a.num_free == 2  # the refused request took nothing
    assert len(a.alloc(2)) == 2
    assert a.alloc(1) is None
    with pytest.raises(ValueError):
        a.alloc(-1)


def test_double_free_and_stray_slots_raise_without_side_effects():
    a = SlotAllocator(8)
    x = a.alloc(4)
    a.free(x[:2])
    with pytest.raises(ValueError, match="twice"):
        a.free([x[0]])
    with pytest.raises(ValueError, match="twice"):  # duplicate within one call
        a.free([x[2], x[2]])
    with pytest.raises(ValueError, match="outside"):
        a.free([8])
    with pytest.raises(ValueError, match="outside"):
        a.free([-1])
    with pytest.raises(ValueError, match="twice"):  # never allocated
        a.free([7])
    # The failed calls freed nothing: x[2], x[3] are still owned and free exactly once.
    assert a.num_used == 2
    a.free(torch.tensor([x[2], x[3]]))
    assert a.num_used == 0


def test_slots_are_reused_after_free():
    a = SlotAllocator(3)
    x = a.alloc(3)
    a.free([x[1]])
    assert a.alloc(1) == [x[1]]


def test_kv_cache_write_and_read():
    cache = KVCache(num_layers=2, num_slots=6, num_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    slots = torch.tensor([5, 0, 3])
    cache.write(1, slots, k, v)
    kb, vb = cache.get(1)
    assert torch.equal(kb[slots], k) and torch.equal(vb[slots], v)
    assert kb[[1, 2, 4]].abs().sum() == 0  # untouched slots stay zero
    assert cache.get(0)[0].abs().sum() == 0  # other layer untouched
    assert cache.nbytes == 2 * 2 * 6 * 2 * 4 * 4


def _config(**kw) -> ModelConfig:
    base = dict(architectures=["Qwen2ForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return ModelConfig.from_dict({**base, **kw})


def test_kv_bytes_and_budget():
    cfg = _config()
    assert kv_bytes_per_token(cfg, torch.float32) == 2 * 3 * 2 * 16 * 4
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 2 * 3 * 2 * 16 * 2
    per = kv_bytes_per_token(cfg, torch.float32)
    assert slots_for_budget(per, 100 * per + per - 1) == 100
    assert slots_for_budget(per, 100 * per, max_slots=40) == 40
    assert slots_for_budget(per, 0, min_slots=8) == 8
