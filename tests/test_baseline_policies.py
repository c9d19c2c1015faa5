"""The shipping engines' batch-wide adaptive schemes as baseline policies: ``batch-ema`` (SGLang's
--speculative-adaptive) and ``batch-table`` (vLLM's dynamic speculative decoding).  Their rules,
their flags, the simulator and the load harness naming them, and greedy identity."""

from __future__ import annotations

import argparse
import json

import pytest

from faser_sgl.bench import cli as bench_cli
from faser_sgl.managers.request import Request, StopConditions
from faser_sgl.options import ENV_VAR, FaserOptions
from faser_sgl.sim import cli as sim_cli
from faser_sgl.sim.settings import parse_setting
from faser_sgl.speculative.batch_ema import BatchEmaLength, BucketRules, EmaBucket
from faser_sgl.speculative.batch_table import BatchTableLength
from faser_sgl.speculative.policy import make_policy
from spec_harness import Engine

PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, list(range(100, 123)), [3, 9], [250, 30, 31, 2, 8]]
DRAFT = ("--speculative-draft-model-path", "/draft")


def make_reqs(n: int, pin: int | None = None) -> list[Request]:
    return [Request(rid=f"r{i}", http_worker_ipc=None, prompt_ids=[1, 2, 3],
                    stop=StopConditions(max_new_tokens=100, stop_token_ids=frozenset()),
                    sampling=None, stream=False, requested_draft_len=pin) for i in range(n)]


def run_batches(policy, reqs: list[Request], accept: float, batches: int) -> list[int]:
    """``batches`` steps: choose, then each request accepts ``accept`` of its drafts (rounded
    down).  Returns the length chosen at each step."""
    chosen = []
    for _ in range(batches):
        lengths = policy.choose_lengths(reqs)
        assert len(set(lengths)) <= 1, "one length for the whole batch"
        chosen.append(lengths[0])
        for req, k in zip(reqs, lengths):
            if k:
                policy.observe(req, k, int(accept * k))
    return chosen


# -- batch-ema: SGLang's rules ----------------------------------------------------------------
def test_candidates_above_k_are_clamped_to_k_and_the_start_is_k_or_the_middle_candidate():
    policy = BatchEmaLength(4)
    assert policy.buckets[1].rules.candidates == (1, 3, 4)  # SGLang's [1, 3, 5, 7]
    assert policy.buckets[8].rules.candidates == (0, 1, 3)
    assert [b.length for b in policy.buckets.values()] == [4, 1, 1, 0]  # K, then middle candidates
    assert BatchEmaLength(2).buckets[1].rules.candidates == (1, 2)
    assert policy.buckets[1].ema == 3.0  # length - 1, a neutral start


def test_warm_up_holds_the_initial_length_then_the_interval_moves_it():
    policy, reqs = BatchEmaLength(4), make_reqs(1)
    chosen = run_batches(policy, reqs, accept=0.0, batches=20)
    # Step i's choice folds in batch i - 1: ten batches of warm-up, then the first
    # reconsideration after five more (at step 16).  Nothing accepted for 15 batches: EMA 3 * 0.8**15 ~ 0.1,
    # at or below 1 - 0.5 - 0.25, so bucket 1 falls to its smallest candidate (it has no 0).
    assert chosen[:15] == [4] * 15
    assert chosen[15:] == [1] * 5
    assert policy.buckets[1].batches == 19


def test_acceptance_moves_the_length_up():
    policy, reqs = BatchEmaLength(4), make_reqs(8)
    chosen = run_batches(policy, reqs, accept=1.0, batches=22)
    # Bucket 8 starts at 1 with EMA 0; all accepted: EMA 1 - 0.8**15 ~ 0.96 > 1 - 0.5: up to 3.
    assert chosen[:15] == [1] * 15 and chosen[15:] == [3] * 7
    assert policy.buckets[1].batches == 0  # only the routed bucket learned


def test_nothing_accepted_goes_to_zero_and_a_probe_follows_each_zero_interval():
    policy, reqs = BatchEmaLength(4), make_reqs(8)
    chosen = run_batches(policy, reqs, accept=0.0, batches=31)
    # EMA stays 0 <= 0.5 + 0: drop to 0 at batch 15; five batches at 0 (counted, EMA untouched),
    # then a probe at 1 for an interval, rejected, and back to 0.
    assert chosen[:15] == [1] * 15
    assert chosen[15:20] == [0] * 5
    assert chosen[20:25] == [1] * 5
    assert chosen[25:30] == [0] * 5
    assert chosen[30] == 1


def _bucket(candidates, down=0.0, up=0.0, start=1) -> EmaBucket:
    # alpha 1: the EMA is the last batch's mean; no warm-up; reconsidered every batch.
    return EmaBucket(BucketRules(candidates, 1.0, 1, 0, down, up, 0.0), start)


def test_hysteresis_makes_moves_harder():
    plain, sticky = _bucket((0, 1)), _bucket((0, 1), down=-0.25)
    plain.record(0.3)
    sticky.record(0.3)
    assert plain.length == 0  # 0.3 <= 0.5
    assert sticky.length == 1  # 0.3 > 0.5 - 0.25
    eager, reluctant = _bucket((0, 1, 3)), _bucket((0, 1, 3), up=0.5)
    eager.record(0.8)
    reluctant.record(0.8)
    assert eager.length == 3  # 0.8 > 1 - 0.5
    assert reluctant.length == 1  # 0.8 <= 1 - 0.5 + 0.5


def test_a_probe_from_zero_without_history_starts_from_its_neutral_average():
    bucket = _bucket((0, 2), start=0)
    assert bucket.ema == -1.0
    bucket.record(None)
    assert bucket.length == 2 and bucket.ema == 1.0


def test_ceiling_caps_a_length_that_did_not_rise():
    bucket = EmaBucket(BucketRules((1, 3, 4), 1.0, 1, 0, -10.0, 0.0, 1.0), 4)
    bucket.record(1.2)  # hysteresis -10 forbids stepping down; the ceiling ceil(1.2) = 2 does not
    assert bucket.length == 1


def test_batch_size_routes_to_the_largest_bucket_not_above_it():
    policy = BatchEmaLength(4)
    assert [policy.choose_lengths(make_reqs(n))[0] for n in (1, 7, 8, 31, 32, 63, 64, 500)] == \
        [4, 4, 1, 1, 1, 1, 0, 0]
    for n, start in ((1, 1), (7, 1), (8, 8), (31, 8), (32, 32), (64, 64), (1000, 64)):
        assert policy.bucket_for(n) is policy.buckets[start]


def test_a_batch_below_every_bucket_goes_to_the_smallest(tmp_path):
    path = tmp_path / "ema.json"
    path.write_text(json.dumps({"ema_alpha": 0.5, "4": {"candidate_steps": [2]}, "16": {"candidate_steps": [0]}}))
    policy = BatchEmaLength(4, str(path))
    assert policy.bucket_for(1) is policy.buckets[4]
    assert policy.buckets[4].rules.ema_alpha == 0.5  # a top-level rule is every bucket's default
    assert policy.choose_lengths(make_reqs(2)) == [2, 2]


def test_a_step_that_verified_nothing_is_not_a_batch_and_a_pin_caps_the_length():
    policy, reqs = BatchEmaLength(4), make_reqs(2)
    for _ in range(3):
        policy.choose_lengths(reqs)  # drafting abandoned: no observation
    assert policy.buckets[1].batches == 0
    # Requests trimmed to 0 drafts do not count in the batch's mean.
    policy.choose_lengths(reqs)
    policy.observe(reqs[0], 4, 4)
    policy.observe(reqs[1], 0, 0)
    policy.choose_lengths(reqs)
    assert policy.buckets[1].ema == pytest.approx(3.0 + 0.2 * (4 - 3.0))
    assert policy.choose_lengths(make_reqs(2, pin=2)) == [2, 2]


# -- batch-table: vLLM's rules ----------------------------------------------------------------
def test_table_lookup_floors_to_the_nearest_lower_batch_size_and_clamps_to_k():
    policy = BatchTableLength(4)  # the default table, 1:4,8:2,32:1,64:0
    sizes = (1, 7, 8, 31, 32, 63, 64, 1000)
    assert [policy.length_for(n) for n in sizes] == [4, 4, 2, 2, 1, 1, 0, 0]
    assert policy.choose_lengths(make_reqs(9)) == [2] * 9
    assert policy.choose_lengths(make_reqs(3, pin=1)) == [1] * 3
    assert [BatchTableLength(2).length_for(n) for n in (1, 8, 32)] == [2, 2, 1]
    custom = make_policy("batch-table", 4, batch_table=" 16:1 , 1:3")
    assert [custom.length_for(n) for n in (1, 15, 16, 17, 5000)] == [3, 3, 1, 1, 1]


# -- flags ------------------------------------------------------------------------------------
def _options(*argv: str) -> FaserOptions:
    parser = argparse.ArgumentParser()
    FaserOptions.add_cli_args(parser)
    return FaserOptions.from_cli_args(parser.parse_args(list(argv)))


def test_flags_reach_the_policies(tmp_path, monkeypatch):
    options = _options("--speculative-policy", "batch-table", *DRAFT, "--faser-batch-table", "1:2,4:0")
    monkeypatch.delenv(ENV_VAR, raising=False)
    options.to_env()  # the way options reach the scheduler process
    options = FaserOptions.from_env()
    assert options.batch_table == "1:2,4:0"
    policy = make_policy(options.speculative_policy, 4, None, options.batch_table, options.batch_ema_config)
    assert policy.name == "batch-table" and policy.length_for(5) == 0
    path = tmp_path / "ema.json"
    path.write_text(json.dumps({"1": {"candidate_steps": [0, 2], "warmup_batches": 0}}))
    options = _options("--speculative-policy", "batch-ema", *DRAFT, "--faser-batch-ema-config", str(path))
    policy = make_policy(options.speculative_policy, 4, None, options.batch_table, options.batch_ema_config)
    assert policy.name == "batch-ema" and policy.buckets[1].rules.warmup_batches == 0


@pytest.mark.parametrize("table, reason", [
    ("", "BATCH_SIZE:K"), ("1:4,x", "BATCH_SIZE:K"), ("1:4;8:2", "BATCH_SIZE:K"), ("1:2.5", "BATCH_SIZE:K"),
    ("2:4,8:2", "first batch size must be 1"), ("1:4,1:2", "appears twice"),
    ("0:3", "start at 1"), ("1:-1", "at least 0"),
])
def test_bad_tables_are_refused_at_start_up(table, reason):
    with pytest.raises(SystemExit) as exc:
        _options("--speculative-policy", "batch-table", *DRAFT, "--faser-batch-table", table)
    assert str(exc.value).startswith("--faser-batch-table") and reason in str(exc.value), str(exc.value)


@pytest.mark.parametrize("config, reason", [
    (None, "cannot read"), ("{not json", "cannot read"), ([1, 2], "JSON object"),
    ({}, "at least one bucket"), ({"1": {"candidate_steps": []}}, "candidate_steps"),
    ({"1": {"candidate_steps": [1, -2]}}, "candidate_steps"), ({"1": {"candidate_steps": [1], "alpha": 0.1}}, "unknown"),
    ({"1": {"candidate_steps": [1]}, "ema_alpha": 0}, "ema_alpha"),
    ({"1": {"candidate_steps": [1], "update_interval": 0}}, "update_interval"),
    ({"one": {"candidate_steps": [1]}}, "unknown top-level"),
])
def test_bad_ema_configs_are_refused_at_start_up(tmp_path, config, reason):
    path = tmp_path / "ema.json"
    if config is not None:
        path.write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(SystemExit) as exc:
        _options("--speculative-policy", "batch-ema", *DRAFT, "--faser-batch-ema-config", str(path))
    assert str(exc.value).startswith("--faser-batch-ema-config") and reason in str(exc.value), str(exc.value)


def test_each_flag_belongs_to_its_policy():
    with pytest.raises(SystemExit, match="only used by --speculative-policy batch-table"):
        _options("--speculative-policy", "fixed", *DRAFT, "--faser-batch-table", "1:4")
    with pytest.raises(SystemExit, match="only used by --speculative-policy batch-ema"):
        _options("--speculative-policy", "batch-table", *DRAFT, "--faser-batch-ema-config", "x.json")
    with pytest.raises(ValueError, match="only used by --speculative-policy batch-table"):
        make_policy("batch-ema", 4, batch_table="1:4")


# -- the load harness and the simulator -------------------------------------------------------
BASELINE_SETTINGS = [
    "--setting", "batch-ema-k4=--speculative-policy batch-ema --speculative-num-draft-tokens 4",
    "--setting", "batch-table-k4=--speculative-policy batch-table --speculative-num-draft-tokens 4 "
                 "--faser-batch-table 1:4,4:2,16:0",
]


def test_the_harness_settings_name_the_baselines():
    args = bench_cli.parse_args(BASELINE_SETTINGS)
    settings = [parse_setting(name, text) for name, text in args.setting]
    assert [(s.name, s.options.speculative_policy) for s in settings] == \
        [("batch-ema-k4", "batch-ema"), ("batch-table-k4", "batch-table")]
    assert settings[1].options.batch_table == "1:4,4:2,16:0" and settings[1].speculative
    with pytest.raises(SystemExit, match="--faser-batch-table"):
        parse_setting("bad", "--speculative-policy batch-table --faser-batch-table 4:1")


def test_the_simulator_runs_the_baselines(tmp_path):
    args = sim_cli.parse_args(["--request-rates", "0.4", "--num-prompts", "6", "--bursty-num-prompts", "0",
                               "--setting", "none=--speculative-policy none", *BASELINE_SETTINGS,
                               "--output-dir", str(tmp_path)])
    _, results = sim_cli.simulate(args, [])
    by_setting = {r["setting"]: r for r in results}
    assert set(by_setting) == {"none", "batch-ema-k4", "batch-table-k4"}
    for name in ("batch-ema-k4", "batch-table-k4"):
        r = by_setting[name]
        assert r["failed"] == 0 and r["spec"]["spec_drafted_tokens"] > 0, r["spec"]
        assert r["metrics"]["total_output"] == by_setting["none"]["metrics"]["total_output"]


# -- lossless ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, extra", [("batch-ema", {}), ("batch-table", {}),
                                           ("batch-table", {"batch_table": "1:2,4:1"})])
def test_greedy_output_identical_to_target_only(tiny_model_path, partial_draft_path, policy, extra):
    base = Engine(tiny_model_path, None)
    expected = base.run([base.make_request(p, 24, temperature=0) for p in PROMPTS])
    engine = Engine(tiny_model_path, partial_draft_path, k=4, policy=policy, **extra)
    assert engine.policy.name == policy
    assert engine.run([engine.make_request(p, 24, temperature=0) for p in PROMPTS]) == expected
    gen = engine.generator
    assert gen.num_drafted > 0 and 0 < gen.num_accepted < gen.num_drafted

