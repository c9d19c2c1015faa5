"""One memory budget for the target's and the draft's KV pools.

The draft's pool has the target's slot count (shared slot numbering), so sizing the target's pool
from memory alone and then allocating the draft's on top overshoots the memory fraction.  These
tests run the real sizing path on CPU with a fixed reading of available memory.
"""

from __future__ import annotations

import types

import pytest
import torch

from faser_sgl.executor import model_runner
from faser_sgl.executor.kv_cache import kv_bytes_per_token
from faser_sgl.executor.model_runner import ModelRunner

# Small enough that memory, not the CPU cap (CPU_CONTEXTS_CAP contexts of 1024 tokens), decides
# the slot count of the tiny models (768 + 256 bytes of KV per token in float32).
AVAILABLE = 1_000_000
FRACTION = 0.5
DRAFT_SHAPE = dict(seed=1, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture
def pair(tiny_model_factory):
    return tiny_model_factory("llama", seed=0), tiny_model_factory("llama", **DRAFT_SHAPE)


@pytest.fixture
def fixed_ram(monkeypatch):
    """Available RAM reads AVAILABLE; records how many models were loaded at each reading."""
    loads, readings = [], []
    real_load = model_runner.load_model

    def load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    def available():
        readings.append(len(loads))
        return AVAILABLE

    monkeypatch.setattr(model_runner, "load_model", load)
    monkeypatch.setattr(model_runner, "_available_ram", available)
    return readings


def per_token(runner: ModelRunner) -> int:
    return kv_bytes_per_token(runner.config, runner.dtype)


def assert_joint_budget(target: ModelRunner, draft: ModelRunner, fraction: float) -> None:
    assert target.num_kv_slots == draft.num_kv_slots
    assert target.allocator.num_total == draft.allocator.num_total == draft.kv_cache.num_slots
    assert target.kv_cache.nbytes + draft.kv_cache.nbytes <= fraction * AVAILABLE
    # ...and the budget is used, not just respected: one more slot of each would not fit.
    assert (target.num_kv_slots + 1) * (per_token(target) + per_token(draft)) > fraction * AVAILABLE


def test_single_model_sizes_to_its_own_bytes(pair, fixed_ram):
    runner = ModelRunner(pair[0], mem_fraction=FRACTION)
    assert runner.num_kv_slots == int(AVAILABLE * FRACTION) // per_token(runner)
    assert runner.kv_cache.nbytes <= FRACTION * AVAILABLE
    assert fixed_ram == [1]


def test_target_and_draft_share_one_budget(pair, fixed_ram):
    draft = ModelRunner(pair[1], defer_kv=True)
    assert draft.kv_cache is None and draft.allocator is None
    target = ModelRunner(pair[0], mem_fraction=FRACTION, draft=draft)
    assert per_token(draft) != per_token(target)  # the shapes differ, so the sum is checked
    assert_joint_budget(target, draft, FRACTION)
    assert fixed_ram == [2], "memory must be read once, after both models' weights are loaded"


def test_explicit_slot_count_sizes_both(pair, fixed_ram):
    draft = ModelRunner(pair[1], defer_kv=True)
    target = ModelRunner(pair[0], max_total_tokens=40, draft=draft)
    assert target.allocator.num_total == draft.allocator.num_total == draft.kv_cache.num_slots == 40
    assert fixed_ram == []


def test_too_few_slots_names_both_models(pair, monkeypatch):
    monkeypatch.setattr(model_runner, "_available_ram", lambda: 20_000)
    draft = ModelRunner(pair[1], defer_kv=True)
    with pytest.raises(RuntimeError, match="KV slots fit") as err:
        ModelRunner(pair[0], mem_fraction=FRACTION, draft=draft)
    assert pair[0] in str(err.value) and pair[1] in str(err.value)
    assert "target" in str(err.value) and "draft" in str(err.value)
    assert draft.kv_cache is None


def test_draft_with_its_own_pool_is_refused(pair):
    draft = ModelRunner(pair[1], max_total_tokens=32)
    with pytest.raises(ValueError, match="defer_kv"):
        ModelRunner(pair[0], max_total_tokens=32, draft=draft)


def test_offline_engine_budgets_both_pools(pair, fixed_ram):
    from faser_sgl.offline_engine import OfflineEngine

    # kv_slots=None: sized from memory, at the default CPU fraction.
    engine = OfflineEngine(pair[0], pair[1], policy="fixed", num_draft_tokens=2, kv_slots=None)
    draft = engine.generator.draft.runner
    assert_joint_budget(engine.runner, draft, model_runner.DEFAULT_MEM_FRACTION["cpu"])
    assert engine.planner.allocator is engine.runner.allocator
    assert fixed_ram == [2]
    reqs = [engine.make_request([5, 6, 7, 8], 6), engine.make_request([9, 10], 5)]
    assert [len(o) for o in engine.run(reqs)] == [6, 5]
    assert engine.runner.allocator.num_used == 0


class _ServerArgs(types.SimpleNamespace):
    """The ServerArgs fields the scheduler reads; any other one is unset (None)."""

    def __getattr__(self, name):
        return None


def test_scheduler_builds_both_pools_from_one_budget(pair, fixed_ram):
    from faser_sgl.managers.scheduler import Scheduler
    from faser_sgl.options import FaserOptions

    # default_kv_slots=None and no --max-total-tokens: the pool is sized from memory.
    options = FaserOptions(speculative_policy="fixed", speculative_draft_model_path=pair[1],
                           speculative_num_draft_tokens=2, default_kv_slots=None, dtype="float32")
    server_args = _ServerArgs(model_path=pair[0], skip_tokenizer_init=True, random_seed=0)
    scheduler = Scheduler(server_args, None, options)
    draft = scheduler.generator.draft.runner
    assert_joint_budget(scheduler.runner, draft, model_runner.DEFAULT_MEM_FRACTION["cpu"])
    assert scheduler.pool_size == draft.allocator.num_total
    assert fixed_ram == [2]
    assert draft.dtype == scheduler.runner.dtype == torch.float32


def test_mem_fraction_static_is_sglangs_share_of_the_whole_memory(pair, fixed_ram, monkeypatch):
    """SGLang's --mem-fraction-static F: the weights and the pools take F of the whole memory, so
    the pools (one budget for target and draft) get what is free after loading less (1 - F) of
    the total; an F that leaves nothing is an error naming the figures."""
    monkeypatch.setattr(model_runner, "_total_ram", lambda: 2 * AVAILABLE)
    draft = ModelRunner(pair[1], defer_kv=True)
    target = ModelRunner(pair[0], mem_fraction_static=0.8, draft=draft)
    budget = AVAILABLE - (1 - 0.8) * 2 * AVAILABLE
    assert target.num_kv_slots == int(budget) // (per_token(target) + per_token(draft))
    assert target.num_kv_slots != int(FRACTION * AVAILABLE) // (per_token(target) + per_token(draft))
    with pytest.raises(RuntimeError, match="40% of .* GiB for weights and KV"):
        ModelRunner(pair[0], mem_fraction_static=0.4)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        ModelRunner(pair[0], mem_fraction_static=1.5)
