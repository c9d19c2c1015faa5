"""FASER's frontier pipeline in the simulator (faser_sgl/sim/pipeline.py): the real controller and
bookkeeping with priced passes on each side of a split.  No model is loaded; everything runs on
the virtual clock, so the timings asserted here are exact sums of the profile's pass costs."""

from __future__ import annotations

import json

import pytest

from faser_sgl.sim.acceptance import load_acceptance
from faser_sgl.sim.cost_profile import CostProfile, ScaledCurve, load_cost_profile
from faser_sgl.sim.engine import SimServer
from faser_sgl.sim.gpu_splits import split_costs
from faser_sgl.sim.pipeline import SimulatedFrontierGenerator, pipeline_splits
from faser_sgl.sim.records import DEFAULT_RECORDS
from faser_sgl.sim.settings import parse_setting
from faser_sgl.sim.arrivals import SimWorkload

FIXED_K4 = "--speculative-policy fixed --speculative-num-draft-tokens 4"


def flat_profile(target_ms: float, draft_ms: float, target_scale: float | None = 1.0,
                 draft_scale: float = 1.0) -> CostProfile:
    """Every pass costs the same whatever its rows (so the step times below are exact sums);
    one split, "cpu:1+1", whose sides cost ``scale`` x the whole machine (None: no splits)."""
    data = {"name": "flat", "target": {"fixed_ms": target_ms, "per_token_ms": 0},
            "draft": {"fixed_ms": draft_ms, "per_token_ms": 0}}
    if target_scale is not None:
        data["splits"] = [{"name": "cpu:1+1", "draft_share": 1, "target": {"scale": target_scale},
                           "draft": {"scale": draft_scale}}]
    return CostProfile.from_dict(data)


def server(args: str, profile, acceptance: str = "bernoulli:0.6", seed: int = 0, noise: float = 0.0) -> SimServer:
    return SimServer(parse_setting("s", args), profile, load_acceptance(acceptance), seed, DEFAULT_RECORDS,
                     cost_noise=noise)


def one_by_one(out_len: int, n: int = 3) -> SimWorkload:
    """Requests far apart: each runs alone, so a step is one request's decode."""
    return SimWorkload("poisson", 0.01, [100.0 * i for i in range(n)], [20] * n, [out_len] * n)


def together(n: int = 6, out_len: int = 40) -> SimWorkload:
    """Requests that all arrive at once: one prefill step, then decode steps of the whole batch
    (no arrival ever lands inside a step, so the steps do not depend on their timing)."""
    return SimWorkload("poisson", 1.0, [0.0] * n, [20 + 7 * i for i in range(n)], [out_len - 3 * i for i in range(n)])


# -- step pricing -----------------------------------------------------------------------------
# Step times (ms) of one request alone, target pass 100, draft pass 50, the split's target side
# 150 and draft side 50, fixed K=4 trimmed to what the request may still emit, frontiers of 2.
# A pipelined step of k=4: its first frontier drafted on the whole machine (2 x 50); round 0:
# max(frontier 1 verified on the target side 150, frontier 2 drafted on the draft side 2 x 50);
# round 1 (only if frontier 1 was accepted) verifies frontier 2 with nothing left to draft, on the
# whole machine: 100.  k=3 pipelines too (round 0 drafts the last draft beside it); k <= 2 fits
# one frontier and runs serially: k x 50 + 100.
ALL_ACCEPTED = dict(acceptance="bernoulli:1", out_len=1 + 5 * 8,  # 8 steps of k=4, 5 tokens each
                    pipelined=[100 + 150 + 100] * 8, serial=[4 * 50 + 100] * 8, pipelined_steps=8)
ALL_REJECTED = dict(acceptance="bernoulli:0", out_len=9,  # one token a step; k = min(4, left - 1)
                    pipelined=[100 + 150] * 4 + [100 + 150, 2 * 50 + 100, 50 + 100, 100],
                    serial=[4 * 50 + 100] * 4 + [3 * 50 + 100, 2 * 50 + 100, 50 + 100, 100], pipelined_steps=5)


@pytest.mark.parametrize("case", [ALL_ACCEPTED, ALL_REJECTED], ids=["all-accepted", "all-rejected"])
def test_a_pinned_frontier_step_costs_the_sum_of_its_rounds(case):
    profile = flat_profile(100, 50, target_scale=1.5, draft_scale=1.0)
    wl = one_by_one(case["out_len"])
    pipe = server(FIXED_K4 + " --faser-frontier-size 2", profile, case["acceptance"]).run(wl, 0)
    serial = server(FIXED_K4 + " --faser-frontier-size 0", profile, case["acceptance"]).run(wl, 0)
    decode_tokens = case["out_len"] - 1  # the first token comes from the prefill step
    assert pipe["metrics"]["mean_tpot_ms"] == pytest.approx(sum(case["pipelined"]) / decode_tokens, rel=1e-9)
    assert serial["metrics"]["mean_tpot_ms"] == pytest.approx(sum(case["serial"]) / decode_tokens, rel=1e-9)
    steps = 3 * case["pipelined_steps"]
    assert pipe["spec"]["spec_pipelined_steps"] == steps and serial["spec"]["spec_pipelined_steps"] == 0
    fp = pipe["sim"]["frontier_pipeline"]
    # The controller chose the pinned mode at every decode step; steps whose trimmed k fits one
    # frontier then ran serially (FrontierGenerator._run_step).
    assert fp["simulated"] and fp["pinned_size"] == 2 and fp["choices"] == {"cpu:1+1 F=2": 3 * len(case["pipelined"])}
    assert fp["frontiers"] == steps * (2 if case is ALL_ACCEPTED else 1)
    assert serial["sim"]["frontier_pipeline"] is None


def test_pinned_pipeline_is_faster_than_serial_where_splits_cost_nothing_and_drafts_are_dear():
    """Split sides as fast as the whole machine, a draft pass as dear as a target pass, some
    rejections: the pipeline hides the second frontier's drafting behind the first one's
    verification, and skips the second frontier's verification where the first already had a
    rejection (serial: 4 x 100 + 100 a step; pipelined: 2 x 100 + max(100, 2 x 100), + 100 when
    the first two drafts pass, p = 0.36)."""
    profile = flat_profile(100, 100)
    wl = one_by_one(60)
    pipe = server(FIXED_K4 + " --faser-frontier-size 2", profile).run(wl, 0)
    serial = server(FIXED_K4 + " --faser-frontier-size 0", profile).run(wl, 0)
    assert pipe["spec"]["spec_pipelined_steps"] > 20
    assert pipe["metrics"]["mean_tpot_ms"] < 0.92 * serial["metrics"]["mean_tpot_ms"]
    assert pipe["metrics"]["mean_e2e_latency_ms"] < serial["metrics"]["mean_e2e_latency_ms"]
    assert pipe["metrics"]["total_output"] == serial["metrics"]["total_output"]
    assert pipe["spec"]["spec_accepted_tokens"] == serial["spec"]["spec_accepted_tokens"]


# -- the controller ---------------------------------------------------------------------------
def test_auto_controller_stays_serial_where_the_split_is_slow_and_pipelines_where_it_is_free():
    slow = server(FIXED_K4 + " --faser-frontier-size auto", flat_profile(100, 100, 3.0, 3.0))
    record = slow.run(together(), 0)
    assert record["spec"]["spec_pipelined_steps"] == 0
    assert set(record["sim"]["frontier_pipeline"]["choices"]) == {"serial"}
    assert record["spec"]["spec_drafted_tokens"] > 0  # it did speculate, serially
    free = server(FIXED_K4 + " --faser-frontier-size auto", flat_profile(100, 100, 1.0, 1.0)).run(together(), 0)
    assert free["spec"]["spec_pipelined_steps"] > 0
    assert any(label != "serial" for label in free["sim"]["frontier_pipeline"]["choices"])


def test_side_passes_reach_the_controllers_split_curves_and_serial_passes_the_whole_machines():
    """The start-up calibration and every pipelined round report each side's pass where the real
    generator does: the split's own curves (not the whole machine's, nor the policy's)."""
    s = server(FIXED_K4 + " --faser-frontier-size 2", flat_profile(100, 50, 1.5, 1.2))
    gen = s.generator
    assert isinstance(gen, SimulatedFrontierGenerator)
    curves = gen.controller.curves["cpu:1+1"]
    assert curves["target"].measured and curves["draft"].measured  # calibrated at start-up
    s.run(together(), 0)
    for n in (1, 3, 5, 12):
        assert curves["target"].predict(n) == pytest.approx(0.150)
        assert gen.pass_costs["target"].predict(n) == pytest.approx(0.100)
    assert curves["draft"].predict(4) == pytest.approx(0.060)
    assert gen.pass_costs["draft"].predict(4) == pytest.approx(0.050)


# -- lossless bookkeeping ---------------------------------------------------------------------
def _emitted_per_step(setting: str, workload, acceptance: str) -> tuple[dict, dict, SimServer]:
    # --chunked-prefill-size 32 pins the draft's catch-up budget to 32 tokens a step.  Otherwise
    # it follows the whole machine's learnt target cost, which legitimately learns other passes
    # in a pipeline (its side passes go to the split's curves), so a request could wait for its
    # catch-up a step longer or shorter and the steps would differ for a reason not under test.
    s = server(setting + " --chunked-prefill-size 32", flat_profile(100, 100), acceptance)
    seen: dict[str, list[int]] = {}

    def on_step(_server, chunks):
        for c in chunks:
            seen.setdefault(c.req.rid, []).append(len(c.req.output_ids))

    s.on_step = on_step
    record = s.run(workload, 0)
    return seen, record, s


@pytest.mark.parametrize("acceptance", ["bernoulli:0.7", str(DEFAULT_RECORDS)])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_pipelined_steps_emit_what_serial_steps_emit(acceptance, size):
    """Same requests, same acceptance sequences, the same lengths (fixed K=4; a pinned size keeps
    the policy's): every request emits the same number of tokens at every step, pipelined or
    not, and the counters agree on what was accepted."""
    serial, s_rec, _ = _emitted_per_step(FIXED_K4 + " --faser-frontier-size 0", together(), acceptance)
    pipe, p_rec, p_server = _emitted_per_step(FIXED_K4 + f" --faser-frontier-size {size}", together(), acceptance)
    assert pipe == serial
    assert p_rec["spec"]["spec_pipelined_steps"] > 0
    for key in ("spec_verify_steps", "spec_accepted_tokens"):
        assert p_rec["spec"][key] == s_rec["spec"][key]
    # A rejected frontier ends the request's verification: the drafts after it were never tested.
    assert p_rec["spec"]["spec_drafted_tokens"] <= s_rec["spec"]["spec_drafted_tokens"]
    # Every slot (rejected drafts rolled back, finished requests released) is back in the pool.
    assert p_server.allocator.num_free == p_server.setting.max_total_tokens


@pytest.mark.parametrize("exit_args", ["--faser-exit-threshold=-1e9 --faser-exit-draft-prob 1e9",
                                       "--faser-exit-threshold 1.0"], ids=["prune-all", "fixed-threshold"])
def test_early_exit_inside_frontiers_keeps_counts_and_slots(exit_args):
    args = FIXED_K4 + f" --faser-frontier-size 2 --faser-early-exit {exit_args}"
    s = server(args, flat_profile(100, 100), "bernoulli:0.7")
    wl = together()
    record = s.run(wl, 0)
    assert record["spec"]["spec_pipelined_steps"] > 0
    assert [q["output_len"] for q in record["requests"]] == list(wl.output_lens)
    assert s.allocator.num_free == s.setting.max_total_tokens
    stats = record["sim"]["early_exit"]
    assert stats is not None
    if "-1e9" in exit_args:  # every frontier is cut after its first scored draft
        assert stats["rows_pruned"] > 0
        assert record["sim"]["frontier_pipeline"]["frontiers"] == record["spec"]["spec_pipelined_steps"]


# -- settings and profiles --------------------------------------------------------------------
def test_a_profile_without_splits_runs_serially_and_says_why():
    s = server(FIXED_K4 + " --faser-frontier-size 2", flat_profile(100, 100, target_scale=None))
    record = s.run(together(), 0)
    assert not isinstance(s.generator, SimulatedFrontierGenerator)
    assert record["spec"]["spec_pipelined_steps"] == 0
    fp = record["sim"]["frontier_pipeline"]
    assert fp["simulated"] is False and "no 'splits' section" in fp["note"]
    # A split share the profile does not price: serial too.
    record = server(FIXED_K4 + " --faser-frontier-size 2 --faser-pipeline-split 3",
                    flat_profile(100, 100)).run(together(), 0)
    assert "--faser-pipeline-split 3" in record["sim"]["frontier_pipeline"]["note"]


def test_same_seed_same_record():
    """The faser policy (adaptive lengths, cost-gated early exit) through pinned frontiers, with
    pass jitter and recorded acceptance: a pure function of the seed."""
    args = "--speculative-policy faser --speculative-num-draft-tokens 4 --faser-frontier-size 2"
    profile = flat_profile(100, 10, 1.1, 1.1)
    a = server(args, profile, str(DEFAULT_RECORDS), seed=5, noise=0.1).run(together(), 0)
    b = server(args, profile, str(DEFAULT_RECORDS), seed=5, noise=0.1).run(together(), 0)
    c = server(args, profile, str(DEFAULT_RECORDS), seed=6, noise=0.1).run(together(), 0)
    assert a["spec"]["spec_pipelined_steps"] > 0
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert json.dumps(a, sort_keys=True) != json.dumps(c, sort_keys=True)


def test_builtin_profiles_price_their_splits():
    cpu = load_cost_profile("cpu-xeon-2core")
    (split,) = cpu.splits
    assert split.name == "cpu:1+1" and split.draft_share == 1
    assert split.seconds("target", 3) == pytest.approx(0.576) and split.seconds("draft", 1) == pytest.approx(0.166)
    for name in ("h100-roofline-qwen3-32b", "h200-roofline-qwen3-32b"):
        gpu = load_cost_profile(name)
        assert [s.draft_share for s in gpu.splits] == [32, 64]
        for s in gpu.splits:  # a side with fewer SMs never beats the whole GPU
            for model in ("target", "draft"):
                assert s.seconds(model, 8) > gpu.seconds(model, 8)
    # --faser-pipeline-split N picks the split with N draft SMs.
    splits, note = pipeline_splits(load_cost_profile("h200-roofline-qwen3-32b"), 64)
    assert [s.name for s in splits] == ["cuda:68+64sm"] and note is None
    # The record's copy of a profile keeps its splits.
    again = CostProfile.from_dict(cpu.to_dict())
    assert again.splits[0].seconds("target", 5) == pytest.approx(split.seconds("target", 5))


def test_gpu_profile_overlap_results_become_scaled_splits():
    overlap = {"results": [
        {"verify_ms": 20.0, "draft_ms": 2.0, "splits": [
            {"split": "streams", "name": "cuda:streams", "draft_share": 0, "verify_busy_ms": 22.0, "draft_busy_ms": 3.0},
            {"split": "green_ctx_32sm", "name": "cuda:100+32sm", "draft_share": 32,
             "verify_busy_ms": 24.0, "draft_busy_ms": 2.5},
            {"split": "green_ctx_16sm_unavailable", "name": "cuda:streams", "draft_share": 0,
             "verify_busy_ms": 99.0, "draft_busy_ms": 99.0}]},
        {"verify_ms": 40.0, "draft_ms": 4.0, "splits": [
            {"split": "streams", "name": "cuda:streams", "draft_share": 0, "verify_busy_ms": 48.0, "draft_busy_ms": 6.0},
            {"split": "green_ctx_32sm", "name": "cuda:100+32sm", "draft_share": 32, "concurrent_ms": 41.0}]}]}
    section = split_costs(overlap)
    assert section == [
        {"name": "cuda:streams", "draft_share": 0, "target": {"scale": 1.15}, "draft": {"scale": 1.5}},
        {"name": "cuda:100+32sm", "draft_share": 32, "target": {"scale": 1.2}, "draft": {"scale": 1.25}}]
    profile = CostProfile.from_dict({"target": {"points": [[1, 20], [64, 40]]}, "draft": {"points": [[1, 2]]},
                                     "splits": section})
    streams = profile.splits[0]
    assert isinstance(streams.target, ScaledCurve)
    assert streams.seconds("target", 64) == pytest.approx(1.15 * 0.040)
