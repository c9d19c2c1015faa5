"""Speculative decoding is lossless: greedy output is token-identical to target-only decoding with
any (ragged) draft lengths, and every KV slot comes back after any mix of accepts, rejects, aborts
and stops.  That sampled output follows the target's distribution is tested in
test_speculative_sampling.py."""

from __future__ import annotations

import random

import pytest

from spec_harness import Engine

PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, list(range(100, 123)), [3, 9], [250, 30, 31, 2, 8],
           list(range(60, 64)), [90] * 3]


@pytest.fixture(scope="module")
def pair(tiny_model_factory):
    target = tiny_model_factory("llama", seed=0)
    unrelated = tiny_model_factory("llama", seed=1)
    return target, unrelated


@pytest.fixture(scope="module")
def drafts(pair, partial_draft_path):
    """Drafts by how often they agree with the target: never, partly, always."""
    target, unrelated = pair
    return {"unrelated": unrelated, "partial": partial_draft_path, "identical": target}


def assert_partial_acceptance(gen) -> None:
    """Both accepted and rejected drafts, in proportions no degenerate draft gives."""
    assert gen.num_drafted > 0
    assert 0.2 < gen.num_accepted / gen.num_drafted < 0.9, (gen.num_accepted, gen.num_drafted)


@pytest.fixture(scope="module")
def target_only_outputs(pair):
    engine = Engine(pair[0], None)
    return engine.run([engine.make_request(p, 24, temperature=0) for p in PROMPTS])


@pytest.mark.parametrize("draft_kind", ["unrelated", "partial", "identical"])
def test_greedy_ragged_lengths_identical_to_target_only(pair, drafts, target_only_outputs, draft_kind):
    target, _ = pair
    engine = Engine(target, drafts[draft_kind], k=4)
    # One batch whose requests draft 0..8 tokens per step.
    reqs = [engine.make_request(p, 24, draft_len=i % 9, temperature=0) for i, p in enumerate(PROMPTS)]
    assert engine.run(reqs) == target_only_outputs
    gen = engine.generator
    assert gen.num_verify_steps > 0
    if draft_kind == "identical":
        assert gen.num_accepted == gen.num_drafted  # a perfect draft is always accepted
    elif draft_kind == "unrelated":
        assert gen.num_accepted == 0  # a rejection at the first draft, every time
    else:
        assert_partial_acceptance(gen)  # rollback after partial acceptance, in both caches


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_greedy_fixed_k_identical(pair, partial_draft_path, target_only_outputs, k):
    engine = Engine(pair[0], partial_draft_path, k=k)
    assert engine.run([engine.make_request(p, 24, temperature=0) for p in PROMPTS]) == target_only_outputs
    assert_partial_acceptance(engine.generator)


def test_randomized_accepts_rejects_aborts_stops_free_every_slot(pair, partial_draft_path):
    """Random draft lengths, random stop tokens, random max_new_tokens, aborts mid-way through the
    scheduler's abort path, and a pool small enough to force retractions: the survivors match
    target-only output exactly and the pool ends full."""
    target, _ = pair
    rng = random.Random(7)
    ref = Engine(target, None)
    spec = Engine(target, partial_draft_path, k=6, slots=90, max_running=6,
                  test_retract_interval=3)  # admission avoids retraction; force some
    for _round in range(3):
        prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(1, 30))] for _ in range(10)]
        limits = [rng.randrange(1, 30) for _ in prompts]
        expected = ref.run([ref.make_request(p, n, temperature=0) for p, n in zip(prompts, limits)])
        reqs = []
        for i, (p, n) in enumerate(zip(prompts, limits)):
            req = spec.make_request(p, n, draft_len=rng.randrange(0, 9), temperature=0)
            if i % 3 == 0 and len(expected[i]) > 3:
                # Stop at a token that appears mid-output: output must end right there.
                stop_tok = expected[i][len(expected[i]) // 2]
                req.stop = type(req.stop)(max_new_tokens=n, stop_token_ids=frozenset({stop_tok}))
                cut = expected[i].index(stop_tok) + 1
                expected[i] = expected[i][:cut]
            reqs.append(req)
        to_abort = set(rng.sample(range(len(reqs)), 3))
        for r in reqs:
            spec.planner.add(r)
        steps = 0
        while spec.planner.has_work():
            spec.step()
            steps += 1
            if steps == 3:
                for i in to_abort:
                    spec.abort(reqs[i].rid)  # what the server does on an AbortReq
        assert spec.runner.allocator.num_used == 0
        assert not spec.planner.running and not spec.planner.waiting
        for i, r in enumerate(reqs):
            if i in to_abort and r.finished_reason["type"] == "abort":
                assert not r.kv_slots
            else:
                assert r.output_ids == expected[i], i
        assert sum(r.finished_reason["type"] == "abort" for r in reqs) >= 1
    assert spec.planner.num_retractions > 0
    assert_partial_acceptance(spec.generator)
