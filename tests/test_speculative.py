"""Speculative decoding is lossless: greedy output is token-identical to target-only decoding with
any (ragged) draft lengths, sampled output follows the target's distribution, and every KV slot
comes back after any mix of accepts, rejects, aborts and stops."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from spec_harness import Engine

PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, list(range(100, 123)), [3, 9], [250, 30, 31, 2, 8],
           list(range(60, 64)), [90] * 3]


def chi2_pvalue(observed: list[int], expected_probs: list[float]) -> float:
    """Pearson chi-square test; bins with expected count < 5 are pooled into one."""
    n = sum(observed)
    obs, exp, pooled_o, pooled_e = [], [], 0, 0.0
    for o, p in zip(observed, expected_probs):
        if p * n >= 5:
            obs.append(o)
            exp.append(p * n)
        else:
            pooled_o += o
            pooled_e += p * n
    if pooled_e > 0:
        obs.append(pooled_o)
        exp.append(pooled_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


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


def _sample_outputs(engine: Engine, prompt: list[int], n: int, max_new: int, params: dict):
    reqs = [engine.make_request(prompt, max_new, sampling_seed=1000 + i, **params) for i in range(n)]
    outs = []
    for start in range(0, n, 250):
        outs += engine.run(reqs[start:start + 250])
    return outs


def _target_probs(engine: Engine, seq: list[int], prompt_len: int, params: dict) -> torch.Tensor:
    """The target's next-token distribution after seq, with the request's sampling transforms."""
    from faser_sgl.executor.forward_batch import ForwardBatch

    runner = engine.runner
    slots = runner.allocator.alloc(len(seq))
    logits = runner.forward(ForwardBatch.build([seq], [slots], [[len(seq) - 1]]))
    runner.allocator.free(slots)
    opts = engine.make_request(seq, 1, **params).sampling
    return engine.sampler.probs(logits, [opts], [seq[prompt_len:]])[0]


def test_rejection_sampling_matches_target_distribution(pair):
    """Draft deliberately different from the target; top-k keeps supports small and different, so
    the residual max(0, p - q) decides what comes out on rejection.  The first output token comes
    from the prefill (target only); tokens 2 and 3 come out of one draft-2 verification step, so
    their joint distribution given token 1 must be the target's."""
    target, unrelated = pair
    params = {"temperature": 0.8, "top_k": 6}
    prompt = [11, 12, 13]
    spec = Engine(target, unrelated, k=2, max_running=250)
    outs = _sample_outputs(spec, prompt, 4000, 4, params)
    gen = spec.generator
    assert 0 < gen.num_accepted < gen.num_drafted, "need both accepted and rejected drafts"
    x1 = Counter(o[0] for o in outs).most_common(1)[0][0]
    given = [o for o in outs if o[0] == x1]
    assert len(given) > 600
    p2 = _target_probs(spec, prompt + [x1], len(prompt), params)
    support2 = sorted(int(t) for t in torch.nonzero(p2).flatten())
    c2 = Counter(o[1] for o in given)
    assert set(c2) <= set(support2)
    pv = chi2_pvalue([c2.get(t, 0) for t in support2], [float(p2[t]) for t in support2])
    assert pv > 1e-3, f"second-token distribution differs from the target's (p={pv})"
    cells, probs = [], []
    for a in support2:
        p3 = _target_probs(spec, prompt + [x1, a], len(prompt), params)
        for b in torch.nonzero(p3).flatten().tolist():
            cells.append((a, b))
            probs.append(float(p2[a] * p3[b]))
    c23 = Counter((o[1], o[2]) for o in given)
    assert sum(c23.values()) == sum(c23.get(c, 0) for c in cells)
    pv = chi2_pvalue([c23.get(c, 0) for c in cells], probs)
    assert pv > 1e-3, f"joint distribution of tokens 2-3 differs from the target's (p={pv})"

    # The test has power: the draft's own distribution at the same point is far from the target's.
    draft_only = Engine(unrelated, None)
    q2 = _target_probs(draft_only, prompt + [x1], len(prompt), params)
    expected_if_draft = [float(q2[t]) for t in support2] + [float(q2.sum() - q2[support2].sum())]
    observed = [c2.get(t, 0) for t in support2] + [0]
    assert chi2_pvalue(observed, [max(p, 1e-12) for p in expected_if_draft]) < 1e-6


def test_randomized_accepts_rejects_aborts_stops_free_every_slot(pair, partial_draft_path):
    """Random draft lengths, random stop tokens, random max_new_tokens, aborts mid-way through the
    scheduler's abort path, and a pool small enough to force retractions: the survivors match
    target-only output exactly and the pool ends full."""
    target, _ = pair
    rng = random.Random(7)
    ref = Engine(target, None)
    spec = Engine(target, partial_draft_path, k=6, slots=90, max_running=6)
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
