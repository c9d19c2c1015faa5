"""The radix prefix cache inside the engine: requests sharing a prefix reuse its KV (target and
draft), outputs and logprobs are those of the cache-off engine, retraction and a tight pool
evict what is unlocked and never what a running request holds, and nothing leaks."""

from __future__ import annotations

import random

import pytest

from faser_sgl.offline_engine import OfflineEngine

SHARED = [5, 17, 42, 9, 88, 120, 33, 7, 64, 250, 11, 301, 47, 92, 18, 77] * 3  # 48 tokens
SUFFIXES = [[3, 4, 5], [300, 12], [6, 6, 6, 6, 19], [41]]
LOGPROBS = {"start_len": -1, "top_num": 2, "token_ids": None}


def run_sequentially(engine, prompts, new=12):
    reqs = []
    for p in prompts:
        req = engine.make_request(p, new, temperature=0.0, logprobs=LOGPROBS)
        engine.run([req])
        reqs.append(req)
    return reqs


def assert_all_returned(engine):
    alloc = engine.runner.allocator
    assert alloc.num_available == alloc.num_total  # nothing locked or held by a request
    assert engine.prefix_cache is None or alloc.num_free + engine.prefix_cache.cached_size == alloc.num_total


@pytest.mark.parametrize("policy", ["none", "fixed"])
def test_shared_prefix_is_reused_and_changes_nothing(tiny_model_path, partial_draft_path, policy):
    draft = partial_draft_path if policy != "none" else None
    off = OfflineEngine(tiny_model_path, draft, policy=policy, num_draft_tokens=3, kv_slots=1024)
    on = OfflineEngine(tiny_model_path, draft, policy=policy, num_draft_tokens=3, kv_slots=1024,
                       prefix_cache=True)
    prompts = [SHARED + s for s in SUFFIXES]
    a, b = run_sequentially(off, prompts), run_sequentially(on, prompts)
    for ra, rb in zip(a, b):
        assert rb.output_ids == ra.output_ids
        assert [e.value for e in rb.logprobs.outputs] == pytest.approx([e.value for e in ra.logprobs.outputs], abs=2e-4)
        assert ra.cached_tokens == 0
    assert b[0].cached_tokens == 0
    assert all(r.cached_tokens >= len(SHARED) for r in b[1:])
    # The same prompt again: everything but its last token comes from the cache.
    again = run_sequentially(on, prompts[:1])[0]
    assert again.cached_tokens == len(prompts[0]) - 1 and again.output_ids == a[0].output_ids
    if policy != "none":
        # The draft's KV was cached too: the repeat drafted without re-feeding the prompt.
        assert on.prefix_cache.num_hit_tokens > 0
    assert_all_returned(off)
    assert_all_returned(on)


def test_concurrent_requests_tight_pool_and_aborts(tiny_model_path, partial_draft_path):
    """Many overlapping prompts at once in a pool that cannot hold them all: the cache evicts,
    running requests retract and resume, a few are aborted; every finished greedy output equals
    the cache-off engine's, and at the end no slot is held by anyone but the cache."""
    rng = random.Random(7)
    prompts = [SHARED[: rng.randint(8, 48)] + [rng.randrange(3, 500) for _ in range(rng.randint(1, 6))]
               for _ in range(14)]
    lp = {"start_len": 2, "top_num": 1, "token_ids": None}
    ref_engine = OfflineEngine(tiny_model_path, policy="none", kv_slots=2048)
    ref_reqs = [ref_engine.make_request(p, 20, temperature=0.0, logprobs=lp) for p in prompts]
    ref = ref_engine.run(ref_reqs)
    engine = OfflineEngine(tiny_model_path, partial_draft_path, policy="fixed", num_draft_tokens=3,
                           kv_slots=160, max_running=8, prefix_cache=True,
                           test_retract_interval=3)  # admission avoids retraction; force some
    reqs = [engine.make_request(p, 20, temperature=0.0, logprobs=lp) for p in prompts]
    for r in reqs:
        engine.planner.add(r)
    steps, aborted = 0, set()
    while engine.planner.has_work():
        engine.step()
        steps += 1
        if steps in (5, 9):
            victim = next(r for r in reqs if not r.finished)
            aborted |= {r.rid for r in engine.abort(victim.rid)}  # by rid prefix
    assert engine.planner.num_retractions > 0
    for r, expected, r_ref in zip(reqs, ref, ref_reqs):
        if r.rid not in aborted:
            assert r.output_ids == expected
            # Retracted and recomputed, or served from the cache: each logprob once, the same.
            got = [e.value for e in r.logprobs.inputs + r.logprobs.outputs]
            want = [e.value for e in r_ref.logprobs.inputs + r_ref.logprobs.outputs]
            assert len(r.logprobs.inputs) == len(r.prompt_ids) - 2
            assert got == pytest.approx(want, abs=2e-4)
    assert sum(r.cached_tokens for r in reqs) > 0
    assert_all_returned(engine)
    assert engine.prefix_cache.flush()
    assert engine.runner.allocator.num_free == engine.runner.allocator.num_total


def test_input_logprobs_are_not_served_from_the_cache(tiny_model_path):
    """A request asking for prompt logprobs from position s recomputes from s: the rows exist."""
    engine = OfflineEngine(tiny_model_path, policy="none", kv_slots=1024, prefix_cache=True)
    run_sequentially(engine, [SHARED + [3]])
    req = engine.make_request(SHARED + [4], 0, temperature=0.0,
                              logprobs={"start_len": 10, "top_num": 0, "token_ids": None})
    engine.run([req])
    assert req.cached_tokens == 9  # the row before position 10 gives token 10's logprob
    assert len(req.logprobs.inputs) == len(SHARED) + 1 - 10
    assert all(e.value is not None for e in req.logprobs.inputs)
