"""The cost profile's context term (attention over the cached context) in the simulator.

A pass costs curve(tokens) + per_context_token_us x context, where context is the sum over the
pass's requests of the KV tokens its attention reads (cached + fed).  The profiles below price
tokens at nothing or at a flat rate, so every expected time is a hand-computed sum of context
terms.  No model is loaded; everything runs on the virtual clock."""

from __future__ import annotations

import json

import pytest

from faser_sgl.sim.acceptance import load_acceptance
from faser_sgl.sim.arrivals import SimWorkload
from faser_sgl.sim.cost_profile import CostProfile, ScaledCurve, load_cost_profile
from faser_sgl.sim.engine import SimServer
from faser_sgl.sim.records import DEFAULT_RECORDS
from faser_sgl.sim.settings import parse_setting

BIG = " --max-total-tokens 4096 --chunked-prefill-size 8192"
FIXED = "--speculative-policy fixed --speculative-num-draft-tokens {k}" + BIG


def server(args: str, profile, acceptance: str = "bernoulli:1") -> SimServer:
    return SimServer(parse_setting("s", args), profile, load_acceptance(acceptance), 0, DEFAULT_RECORDS)


def profile(target_ms=0.0, draft_ms=0.0, target_ctx_us=None, draft_ctx_us=None, splits=None) -> CostProfile:
    data = {"name": "ctx", "target": {"fixed_ms": target_ms, "per_token_ms": 0},
            "draft": {"fixed_ms": draft_ms, "per_token_ms": 0}}
    if target_ctx_us is not None:
        data["target"]["per_context_token_us"] = target_ctx_us
    if draft_ctx_us is not None:
        data["draft"]["per_context_token_us"] = draft_ctx_us
    if splits is not None:
        data["splits"] = splits
    return CostProfile.from_dict(data)


def workload(prompts, outputs) -> SimWorkload:
    n = len(prompts)
    return SimWorkload("poisson", 1.0, [0.0] * n, list(prompts), list(outputs))


# -- the profile ------------------------------------------------------------------------------
def test_a_pass_costs_its_curve_plus_the_context_term():
    p = CostProfile.from_dict({"target": {"points": [[1, 10], [101, 20]], "per_context_token_us": 50},
                               "draft": {"fixed_ms": 2, "per_token_ms": 0.5}})
    assert p.seconds("target", 51, 0) == pytest.approx(0.015)
    assert p.seconds("target", 51, 1000) == pytest.approx(0.015 + 1000 * 50e-6)
    assert p.seconds("draft", 4, 1000) == pytest.approx(0.004)  # no term: context is free
    assert p.has_context_term
    again = CostProfile.from_dict(p.to_dict())
    assert again.seconds("target", 51, 1000) == pytest.approx(p.seconds("target", 51, 1000))
    with pytest.raises(ValueError):
        CostProfile.from_dict({"target": {"fixed_ms": 1, "per_token_ms": 0, "per_context_token_us": -1},
                               "draft": {"fixed_ms": 1, "per_token_ms": 0}})


def test_split_sides_scale_inherit_or_state_their_context_term():
    p = profile(10, 2, target_ctx_us=100, draft_ctx_us=10, splits=[
        {"name": "cpu:1+1", "draft_share": 1, "target": {"scale": 1.5},
         "draft": {"points": [[1, 3]]}},
        {"name": "cuda:100+32sm", "draft_share": 32, "target": {"scale": 2.0, "per_context_token_us": 120},
         "draft": {"points": [[1, 4]], "per_context_token_us": 40}}])
    scaled, own = p.splits
    assert isinstance(scaled.target, ScaledCurve)
    assert scaled.seconds("target", 3, 100) == pytest.approx(1.5 * (0.010 + 100 * 100e-6))
    assert scaled.seconds("draft", 1, 100) == pytest.approx(0.003 + 100 * 10e-6)  # inherits the whole's
    assert own.seconds("target", 3, 100) == pytest.approx(2.0 * 0.010 + 100 * 120e-6)
    assert own.seconds("draft", 1, 100) == pytest.approx(0.004 + 100 * 40e-6)
    again = CostProfile.from_dict(p.to_dict())
    for a, b in zip(again.splits, p.splits):
        for model in ("target", "draft"):
            assert a.seconds(model, 2, 77) == pytest.approx(b.seconds(model, 2, 77))


def test_a_profile_without_the_term_is_unchanged():
    """No ``per_context_token_us``: the record is the same as with an explicit 0, passes cost
    their token price only, and the profile's dict (the record's copy) gains no field."""
    wl = workload([10, 20, 30], [5, 7, 9])
    plain = profile(100, 10, splits=[{"name": "cpu:1+1", "draft_share": 1, "target": {"scale": 1.5},
                                      "draft": {"scale": 1.2}}])
    zero = profile(100, 10, target_ctx_us=0, draft_ctx_us=0,
                   splits=[{"name": "cpu:1+1", "draft_share": 1, "target": {"scale": 1.5}, "draft": {"scale": 1.2}}])
    assert not plain.has_context_term
    assert "per_context_token_us" not in json.dumps(plain.to_dict())
    for args in ("", FIXED.format(k=4), FIXED.format(k=4) + " --faser-frontier-size 2"):
        a = server(args + BIG, plain, "bernoulli:0.7").run(wl, 0)
        b = server(args + BIG, zero, "bernoulli:0.7").run(wl, 0)
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    # `none`: one prefill step (all three prompts), then 8 decode steps of 100 ms each.
    none = server(BIG, plain).run(wl, 0)
    assert none["sim"]["busy_s"]["target"] == pytest.approx(0.1 * 9)
    assert none["sim"]["context"]["target"] > 0  # counted for the record, never priced
    for name in ("cpu-xeon-2core",):
        assert not load_cost_profile(name).has_context_term


# -- the plumbing: hand-computed batches -------------------------------------------------------
def test_plain_decoding_pays_each_requests_cached_tokens_plus_its_feed():
    """`none`, prompts 10 and 20, 3 tokens each; target 100 ms a pass + 1 ms per context token.
    Prefill: 30 tokens read 30.  Decode 1: each request reads its prompt + its newest token
    (11 + 21); decode 2: 12 + 22."""
    s = server(BIG, profile(100, 0, target_ctx_us=1000))
    rec = s.run(workload([10, 20], [3, 3]), 0)
    assert rec["sim"]["context"]["target"] == 30 + 32 + 34
    assert rec["sim"]["busy_s"]["target"] == pytest.approx(3 * 0.100 + (30 + 32 + 34) * 0.001)
    assert rec["metrics"]["mean_e2e_latency_ms"] == pytest.approx(1e3 * (0.3 + 0.096))
    assert rec["metrics"]["mean_ttft_ms"] == pytest.approx(1e3 * (0.1 + 0.030))


def test_a_serial_speculative_step_prices_draft_and_verification_context():
    """Fixed K=2, all accepted, one request: prompt 10, 7 tokens (1 from prefill, 3 per step).
    Draft KV read per pass = the draft's cache after its feed; target = committed + drafts.
    Step 1: draft pass 0 feeds prompt + newest (reads 11), pass 1 feeds d1 (12); verification
    reads 11 + 2 = 13.  Step 2 (committed 14): draft reads 14 (feeds d2 and the bonus token), 15;
    verification 16.  Draft 0.5 ms, target 2 ms per context token, passes otherwise free."""
    s = server(FIXED.format(k=2), profile(0, 0, target_ctx_us=2000, draft_ctx_us=500))
    rec = s.run(workload([10], [7]), 0)
    assert [q["output_len"] for q in rec["requests"]] == [7]
    assert rec["sim"]["context"] == {"target": 10 + 13 + 16, "draft": 11 + 12 + 14 + 15}
    assert rec["sim"]["busy_s"]["target"] == pytest.approx((10 + 13 + 16) * 0.002)
    assert rec["sim"]["busy_s"]["draft"] == pytest.approx((11 + 12 + 14 + 15) * 0.0005)
    assert rec["metrics"]["mean_e2e_latency_ms"] == pytest.approx(39 * 2 + 52 * 0.5)


def test_a_pipelined_step_prices_each_sides_context():
    """Fixed K=4, frontiers of 2, all accepted, one request: prompt 10, 6 tokens.  Prefill reads
    10 (1 ms/token).  The first frontier is drafted on the whole machine (0.5 ms/token): reads 11
    and 12.  Round 0: the target side verifies newest + d1, d2 (reads 11 + 2 = 13 at 2 ms/token:
    26 ms) while the draft side makes d3, d4 (reads 13 and 14 at 3 ms/token: 81 ms): 81 ms.
    Round 1, nothing left to draft, on the whole machine: d3, d4 (reads 11 + 4 = 15: 15 ms)."""
    split = [{"name": "cpu:1+1", "draft_share": 1, "target": {"fixed_ms": 0, "per_token_ms": 0,
                                                              "per_context_token_us": 2000},
              "draft": {"fixed_ms": 0, "per_token_ms": 0, "per_context_token_us": 3000}}]
    p = profile(0, 0, target_ctx_us=1000, draft_ctx_us=500, splits=split)
    rec = server(FIXED.format(k=4) + " --faser-frontier-size 2", p).run(workload([10], [6]), 0)
    assert rec["spec"]["spec_pipelined_steps"] == 1
    assert rec["sim"]["context"] == {"target": 10 + 13 + 15, "draft": 11 + 12 + 13 + 14}
    assert rec["metrics"]["mean_e2e_latency_ms"] == pytest.approx(10 + (11 + 12) * 0.5 + max(26, 81) + 15)
    # Serially: drafts read 11..14, one verification reads 15.
    serial = server(FIXED.format(k=4) + " --faser-frontier-size 0", p).run(workload([10], [6]), 0)
    assert serial["metrics"]["mean_e2e_latency_ms"] == pytest.approx(10 + (11 + 12 + 13 + 14) * 0.5 + 15)


def test_early_exit_segments_pay_the_context_of_the_rows_left():
    """Every pruned row is one token fewer fed and read for the layers after its exit: with a
    context-only target profile the verification time is exactly the context read minus the
    pruned rows' skipped share (early exit's layer_rows_saved / depth)."""
    c = 1e-3
    args = FIXED.format(k=4) + " --faser-early-exit --faser-exit-threshold=-1e9 --faser-exit-draft-prob 1e9"
    s = server(args, profile(0, 0, target_ctx_us=c * 1e6), "bernoulli:0.7")
    rec = s.run(workload([10, 20, 30], [12, 15, 9]), 0)
    ee = rec["sim"]["early_exit"]
    assert ee["rows_pruned"] > 0
    expected = c * (rec["sim"]["context"]["target"] - ee["layer_rows_saved"] / s.generator.early_exit.num_layers)
    assert rec["sim"]["busy_s"]["target"] == pytest.approx(expected, rel=1e-9)


def test_builtin_gpu_profiles_have_the_derived_context_term():
    """Target KV per token: 2 x 64 layers x 8 KV heads x 128 x 2 bytes = 262144 B, read at 80% of
    the HBM bandwidth (TP4: a quarter per GPU); the draft's, 2 x 28 x 8 x 128 x 2 = 114688 B."""
    for name, bw, tp in (("h100-roofline-qwen3-32b", 3.35e12, 1), ("h200-roofline-qwen3-32b", 4.8e12, 1),
                         ("h100x4-tp4-roofline-qwen3-32b", 3.35e12, 4)):
        p = load_cost_profile(name)
        assert p.target.per_context_s == pytest.approx(262144 / tp / (0.8 * bw), rel=1e-3)
        assert p.draft.per_context_s == pytest.approx(114688 / tp / (0.8 * bw), rel=1e-3)
        assert [s.draft_share for s in p.splits] == [32, 64]
        for s in p.splits:  # a side with fewer SMs never beats the whole GPU, context included
            for model in ("target", "draft"):
                assert s.seconds(model, 8, 10_000) > p.seconds(model, 8, 10_000)
    tp4 = load_cost_profile("h100x4-tp4-roofline-qwen3-32b")
    one = load_cost_profile("h100-roofline-qwen3-32b")
    assert tp4.seconds("target", 1) < one.seconds("target", 1) / 2.5  # a quarter of the weights + all-reduces


def test_the_roofline_profiles_are_what_their_script_derives():
    """scripts/roofline_profiles.py writes the three GPU profiles; the files are its output."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "roofline_profiles.py"
    spec = importlib.util.spec_from_file_location("roofline_profiles", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0
