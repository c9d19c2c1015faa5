"""The adaptive drafter: per-request lengths from each request's acceptance and the measured cost
of drafting and verifying; lossless whatever it chooses."""

from __future__ import annotations

import pytest

from faser_sgl.managers.request import Request, StopConditions
from faser_sgl.speculative.adaptive import AdaptiveLength, CostCurve, expected_tokens
from spec_harness import Engine

PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, list(range(100, 123)), [3, 9], [250, 30, 31, 2, 8]]


def make_req(rid: str) -> Request:
    return Request(rid=rid, http_worker_ipc=None, prompt_ids=[1, 2, 3],
                   stop=StopConditions(max_new_tokens=100, stop_token_ids=frozenset()),
                   sampling=None, stream=False)


def teach_costs(policy: AdaptiveLength, target: tuple[float, float], draft: tuple[float, float]) -> None:
    """Feed the policy forward passes of many sizes timed as fixed + per_token * tokens."""
    for _ in range(300):
        for n in (1, 3, 8, 20, 64):
            policy.observe_forward("target", n, target[0] + target[1] * n)
            policy.observe_forward("draft", n, draft[0] + draft[1] * n)


def test_cost_curve_follows_measurements():
    curve = CostCurve(fixed_s=1.0, per_token_s=1.0)  # a prior far from the truth
    assert curve.predict(10) == pytest.approx(11.0)
    # CPU-like: a decode row costs 0.3 s, five rows 1.0 s, a 300-token chunk 4 s.
    for _ in range(30):
        for n, seconds in ((1, 0.3), (5, 1.0), (300, 4.0)):
            curve.observe(n, seconds)
    assert curve.predict(1) == pytest.approx(0.3)
    assert curve.predict(3) == pytest.approx(0.65)  # between the measured sizes
    assert curve.predict(100) == pytest.approx(1.0 + 3.0 * 95 / 295)
    assert curve.predict(600) == pytest.approx(4.0 + 3.0 * 300 / 295)  # the last segment, extended
    # The machine gets busier at one size: that bucket moves to the new cost.
    for _ in range(40):
        curve.observe(5, 2.0)
    assert curve.predict(5) == pytest.approx(2.0, rel=1e-3)


def test_expected_tokens_of_a_verification():
    assert expected_tokens(0.5, 3) == pytest.approx(1.875)
    assert expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.0, 4) == 1


def test_acceptance_estimate_follows_the_request():
    policy = AdaptiveLength(4)
    good, bad = make_req("good"), make_req("bad")
    assert policy.accept_rate(good) == pytest.approx(AdaptiveLength.PRIOR_RATE)
    for _ in range(10):
        policy.observe(good, 4, 4)
        policy.observe(bad, 4, 0)
    assert policy.accept_rate(good) > 0.9 and policy.accept_rate(bad) < 0.3


def test_cheap_verification_drafts_the_longest():
    """GPU-like: a pass costs about the same for 1 or 20 tokens, the draft is cheap."""
    policy = AdaptiveLength(6)
    teach_costs(policy, target=(0.030, 1e-5), draft=(0.002, 1e-5))
    reqs = [make_req(str(i)) for i in range(4)]
    for r in reqs:
        for _ in range(5):
            policy.observe(r, 6, 6)
    assert policy.choose_lengths(reqs, step_tokens=4) == [6, 6, 6, 6]


def test_per_token_cost_drafts_nothing():
    """CPU-like: every extra row costs as much as a row of the batch; no draft pays off."""
    policy = AdaptiveLength(6)
    teach_costs(policy, target=(0.0, 0.010), draft=(0.0, 0.004))
    reqs = [make_req(str(i)) for i in range(3)]
    for r in reqs:
        for _ in range(5):
            policy.observe(r, 6, 6)
    assert policy.choose_lengths(reqs, step_tokens=3) == [0, 0, 0]


def test_lengths_differ_per_request_and_an_idle_request_is_probed_again():
    policy = AdaptiveLength(4)
    teach_costs(policy, target=(0.020, 0.004), draft=(0.001, 0.002))
    good, bad = make_req("good"), make_req("bad")
    for _ in range(10):
        policy.observe(good, 4, 4)
        policy.observe(bad, 4, 0)
    good_k, bad_k = policy.choose_lengths([good, bad], step_tokens=2)
    assert good_k > 0 and bad_k == 0
    # "bad" is no longer observed; its estimate drifts back to the prior until it is tried again.
    for step in range(200):
        if policy.choose_lengths([good, bad], step_tokens=2)[1] > 0:
            break
    else:
        pytest.fail("an idle request was never probed again")
    assert step > 3  # not immediately: its record was bad


def test_a_lagging_draft_is_caught_up_only_when_the_rest_of_the_request_repays_it():
    """Just after a 400-token prefill the draft model has seen none of the prompt; its first
    drafting step must feed all of it.  Worth it for a long generation, not for 3 more tokens."""
    policy = AdaptiveLength(4)
    teach_costs(policy, target=(0.030, 1e-4), draft=(0.005, 0.0005))

    def after_prefill(max_new_tokens: int, draft_seen: int = 0) -> Request:
        req = Request(rid=str(max_new_tokens), http_worker_ipc=None, prompt_ids=list(range(400)),
                      stop=StopConditions(max_new_tokens=max_new_tokens, stop_token_ids=frozenset()),
                      sampling=None, stream=False)
        req.output_ids, req.kv_slots, req.draft_cached = [7], list(range(401)), draft_seen
        for _ in range(5):
            policy.observe(req, 4, 4)
        return req

    assert policy.choose_lengths([after_prefill(4)], step_tokens=1) == [0]
    assert policy.choose_lengths([after_prefill(1000)], step_tokens=1) == [4]
    assert policy.choose_lengths([after_prefill(4, draft_seen=400)], step_tokens=1) == [4]


def test_drafts_shrink_as_the_batch_grows():
    """Low load: the pass's fixed cost dominates, so drafting is nearly free.  High load: a draft
    token must beat the average row of a full batch, so drafts get short or vanish."""
    policy = AdaptiveLength(4)
    teach_costs(policy, target=(0.030, 0.001), draft=(0.002, 0.0005))
    reqs = [make_req(str(i)) for i in range(32)]
    for r in reqs:
        for _ in range(5):
            policy.observe(r, 4, 3)
    alone = policy.choose_lengths(reqs[:1], step_tokens=1)
    crowded = policy.choose_lengths(reqs, step_tokens=32)
    assert alone == [4]
    assert max(crowded) < 4


@pytest.fixture(scope="module")
def pair(tiny_model_factory):
    return tiny_model_factory("llama", seed=0), tiny_model_factory("llama", seed=1)


@pytest.mark.parametrize("draft_kind", ["unrelated", "identical"])
def test_adaptive_greedy_output_identical_to_target_only(pair, draft_kind):
    target, unrelated = pair
    base = Engine(target, None)
    expected = base.run([base.make_request(p, 24, temperature=0) for p in PROMPTS])
    engine = Engine(target, unrelated if draft_kind == "unrelated" else target, k=5, policy="adaptive")
    policy = engine.policy
    # Tiny models cost the same to draft as to verify, so no draft would ever pay: pin a cheap
    # draft so that speculation happens, and record what the policy chose.
    policy.draft_cost = CostCurve(fixed_s=1e-6, per_token_s=1e-7)
    policy.observe_forward = lambda model, n, s: policy.target_cost.observe(n, s) if model == "target" else None
    chosen: list[list[int]] = []
    choose = policy.choose_lengths
    policy.choose_lengths = lambda reqs, step_tokens=0: chosen.append(choose(reqs, step_tokens)) or chosen[-1]
    assert engine.run([engine.make_request(p, 24, temperature=0) for p in PROMPTS]) == expected
    assert engine.generator.num_verify_steps > 0
    if draft_kind == "identical":
        assert engine.generator.num_accepted == engine.generator.num_drafted
    else:
        assert engine.generator.num_accepted < engine.generator.num_drafted
        # Requests accept differently, so one step drafts different lengths (0 included).
        assert any(len(set(ks)) > 1 for ks in chosen), "lengths never differed between requests"


def test_calibration_times_every_verification_size_and_frees_its_slots(pair):
    """Before serving, the generator times the passes the adaptive policy asks for (every
    verification size of a lone request, then batch sizes) on scratch slots it gives back."""
    target, draft = pair
    engine = Engine(target, draft, k=3, slots=48, policy="adaptive")  # 64 tokens do not fit
    assert engine.runner.allocator.num_used == 0
    seen: list[tuple[str, int, float]] = []
    engine.policy.observe_forward = lambda model, n, s: seen.append((model, n, s))
    assert engine.generator.calibrate(repeats=2) > 0
    assert [n for m, n, _ in seen if m == "target"] == [1, 2, 3, 4, 8, 16, 32] * 2
    assert [n for m, n, _ in seen if m == "draft"] == [1, 2, 4, 8, 16, 32] * 2
    assert all(s > 0 for _, _, s in seen)
    assert engine.runner.allocator.num_used == 0
    # A policy that ignores costs gets no calibration passes.
    fixed = Engine(target, draft, k=3, policy="fixed")
    assert fixed.generator.calibrate() == 0.0


@pytest.fixture(scope="module")
def adaptive_server(pair, tmp_path_factory):
    from server_utils import start_server

    target, draft = pair
    server = start_server(target, tmp_path_factory.mktemp("adaptive"), [
        "--max-total-tokens", "2048", "--enable-metrics", "--speculative-policy", "adaptive",
        "--speculative-draft-model-path", draft, "--speculative-num-draft-tokens", "4"])
    yield server, target
    server.stop()


def test_adaptive_server_is_lossless_and_reports_its_choices(adaptive_server):
    import requests

    from reference import hf_greedy, load_hf_model
    from test_metrics import scrape

    server, target = adaptive_server
    hf = load_hf_model(target)
    before = scrape(server)
    for prompt in ([5, 17, 33], list(range(40, 70)), [3, 9]):
        r = requests.post(f"{server.base_url}/generate", timeout=120, json={
            "input_ids": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}})
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == hf_greedy(hf, prompt, 16)
        meta = r.json()["meta_info"]
        if meta.get("spec_verify_ct"):
            # Per verification pass, not per decode step: steps with k = 0 do not count.
            assert 1.0 <= meta["spec_accept_length"] <= 4 + 1
    state = server.wait_kv_free()
    assert state["speculative_policy"] == "adaptive"
    after = scrape(server)
    # Every decode step's choice is in the draft-length histogram, zeros included.
    assert after["faser:spec_draft_length_count"] - before.get("faser:spec_draft_length_count", 0) >= 3 * 15 / 5
