"""A speculative step in which nobody drafts costs what a step without speculation costs
(issue 25, item 2): no draft pass, no per-request acceptance, the speculation-free generator's
one pass and one batched sampling call, and the same output and logprobs as `none`."""

from __future__ import annotations

import pytest

from faser_sgl.speculative.spec_generator import SpeculativeGenerator
from spec_harness import Engine

PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, [3, 9]]
LOGPROBS = {"start_len": 0, "top_num": 3, "token_ids": None}
# Every row costs a whole pass and a draft pass costs as much: drafting never pays.
NEVER_PAYS = "target=0+10,draft=10+10"


def _requests(engine):
    greedy = [engine.make_request(p, 12, temperature=0, logprobs=LOGPROBS) for p in PROMPTS]
    sampled = [engine.make_request(p, 12, temperature=0.8, sampling_seed=i, ignore_eos=True)
               for i, p in enumerate(PROMPTS)]
    return greedy + sampled


def _figures(reqs):
    return [(r.output_ids, r.logprobs.outputs if r.logprobs is not None else None) for r in reqs]


@pytest.mark.parametrize("policy,profile", [("fixed", None), ("adaptive", NEVER_PAYS), ("faser", NEVER_PAYS)])
def test_steps_without_drafts_run_as_plain_steps(tiny_model_factory, partial_draft_path, monkeypatch,
                                                 policy, profile):
    target = tiny_model_factory("llama", seed=0)
    plain = Engine(target, None)
    plain_reqs = _requests(plain)
    plain.run(plain_reqs)

    engine = Engine(target, partial_draft_path, k=4, policy=policy, cost_profile=profile,
                    frontier_size=0)  # serial: the frontier controller may lengthen drafts itself
    reqs = _requests(engine)
    if policy == "fixed":  # the fixed policy drafts what a request pins: nothing here
        for r in reqs:
            r.requested_draft_len = 0
    drafts, accepts = [], []
    monkeypatch.setattr(engine.generator.draft, "forward", lambda *a: drafts.append(a))
    real_accept = SpeculativeGenerator._accept
    monkeypatch.setattr(SpeculativeGenerator, "_accept", lambda *a, **kw: accepts.append(1) or real_accept(*a, **kw))
    engine.run(reqs)
    gen = engine.generator
    assert drafts == [] and accepts == []  # no draft pass, no per-request acceptance
    assert gen.num_plain_steps > 0 and gen.num_verify_steps == 0
    # Greedy text and logprobs are none's; sampled requests ran to their length.
    assert _figures(reqs[: len(PROMPTS)]) == _figures(plain_reqs[: len(PROMPTS)])
    assert all(len(r.output_ids) == 12 for r in reqs[len(PROMPTS):])
    # The plain steps' passes still teach the policy its target costs (adaptive/faser).
    if profile is None:
        assert gen.pass_costs["target"].measured


def test_a_step_with_drafts_still_verifies(tiny_model_factory, partial_draft_path):
    target = tiny_model_factory("llama", seed=0)
    engine = Engine(target, partial_draft_path, k=2)
    engine.run([engine.make_request(p, 12, temperature=0) for p in PROMPTS])
    gen = engine.generator
    assert gen.num_verify_steps > 0 and gen.num_drafted > 0
    assert gen.num_plain_steps > 0  # the prefill steps (decodes draft nothing beside a prefill)


def test_the_policy_predicts_the_step_it_chose():
    """Issue 25, item 1: on a pinned cost profile the predicted step is the profile's price of
    its passes: one target pass over the step's tokens and drafts, a draft pass per position."""
    from faser_sgl.speculative.policy import make_policy
    from test_adaptive_policy import make_req

    policy = make_policy("adaptive", 4, "target=30+0.01,draft=2+0.01")
    reqs = [make_req("a"), make_req("b")]
    for r in reqs:  # the draft has seen everything: no catch-up to price
        r.kv_slots, r.draft_cached = [0, 1, 2], 3
    assert policy.predict_step(reqs, [2, 1], 2) == pytest.approx((30 + 0.05 + 2 + 0.02 + 2 + 0.01) / 1000)
    assert policy.predict_step(reqs, [0, 0], 2) == pytest.approx((30 + 0.02) / 1000)


def test_every_speculative_step_carries_its_prediction(tiny_model_factory, partial_draft_path):
    target = tiny_model_factory("llama", seed=0)
    engine = Engine(target, partial_draft_path, k=2)
    engine.generator.predict_steps = True  # as the scheduler sets it with metrics or step records
    seen = []
    real = engine.generator._run_step

    def spy(chunks, decodes, lengths, catch_up):
        seen.append((tuple(lengths), engine.generator.last_prediction))
        return real(chunks, decodes, lengths, catch_up)
    engine.generator._run_step = spy
    engine.run([engine.make_request(p, 8, temperature=0) for p in PROMPTS])
    assert seen and all(p is not None and p[0] > 0 and p[1] > 0 for _, p in seen)
    # Without drafts the step as chosen is the step without drafts.  (With drafts no order is
    # asserted: measured cost curves need not rise with the tokens.)
    assert all(p[0] == p[1] for lengths, p in seen if not any(lengths))
    assert any(any(lengths) for lengths, _ in seen)


def test_the_prediction_adds_the_measured_overhead_outside_the_passes():
    """What a step costs besides its passes (sampling, accepting, outputs) is measured per step
    and added to its prediction: for a step without drafts by its requests, for a drafting step
    by the rows it verifies (accepting costs per verified row, so drafting under load costs more
    outside the passes than a plain step of the same requests)."""
    from faser_sgl.speculative.policy import make_policy
    from test_adaptive_policy import make_req

    policy = make_policy("adaptive", 4, "target=30+0.01,draft=2+0.01")
    reqs = [make_req("a"), make_req("b")]
    for r in reqs:
        r.kv_slots, r.draft_cached = [0, 1, 2], 3
    without = policy.predict_step(reqs, [2, 1], 2), policy.predict_step(reqs, [0, 0], 2)
    policy.observe_step_overhead(False, 2, 0.004)  # a plain step of 2 requests
    policy.observe_step_overhead(True, 5, 0.010)  # a drafting step verifying 2 + 3 rows
    assert policy.step_overhead(False, 2) == pytest.approx(0.004)
    assert policy.predict_step(reqs, [2, 1], 2) == pytest.approx(without[0] + 0.010)
    assert policy.predict_step(reqs, [0, 0], 2) == pytest.approx(without[1] + 0.004)


def test_the_generator_measures_overhead_as_wall_time_less_its_passes(tiny_model_factory, partial_draft_path):
    target = tiny_model_factory("llama", seed=0)
    engine = Engine(target, partial_draft_path, k=2, policy="adaptive")
    gen = engine.generator
    shapes = []
    real_step = gen.generate

    def step(chunks):
        out = real_step(chunks)
        drafted, rows = gen._step_shape
        shapes.append((drafted, rows, gen._step_pass_s))
        # 3 ms outside the passes of a plain step, 1 ms per verified row of a drafting one
        gen.observe_step(len(chunks), gen._step_pass_s + (0.001 * rows if drafted else 0.003))
        return out
    gen.generate = step
    engine.run([engine.make_request(p, 6, temperature=0) for p in PROMPTS])
    assert shapes and all(s > 0 for *_, s in shapes)  # every step timed its passes
    drafting = [rows for drafted, rows, _ in shapes if drafted]
    assert drafting and any(not drafted for drafted, *_ in shapes)
    assert gen.policy.step_overhead(False, len(PROMPTS)) == pytest.approx(0.003, rel=1e-6)
    assert gen.policy.step_overhead(True, drafting[-1]) == pytest.approx(0.001 * drafting[-1], rel=1e-6)
    assert gen.overhead_cost.predict(True, drafting[-1]) == pytest.approx(0.001 * drafting[-1], rel=1e-6)
