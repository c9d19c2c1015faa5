"""FASER early exit inside verification (faser_sgl/speculative/early_exit.py).

Lossless whatever the predictor says: greedy output stays token-identical to target-only
decoding and sampled output keeps the target's law, with the default threshold, with one that
prunes most drafts, and with one that prunes every draft at the first exit layer.  Pruned rows
really skip the later layers, their KV slots come back, and the batch cut mid-pass is the batch
that would have been built without the pruned tokens.
"""

from __future__ import annotations

import time

import pytest
import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.speculative import early_exit
from faser_sgl.speculative.adaptive import CostCurve
from faser_sgl.speculative.spec_generator import SpeculativeGenerator
from spec_harness import Engine
from test_speculative_sampling import NOISY_DRAFT, first_verification_check

PROMPTS = [[5, 17, 33], list(range(40, 75)), [7] * 11, list(range(100, 123)), [3, 9], [250, 30, 31, 2, 8]]
PRUNE_ALL = float("-inf")  # with LENS_ONLY: every scored draft is predicted rejected
AGGRESSIVE = -3.0  # prune unless d_j's lens logit beats every alternative's by 3
LENS_ONLY = float("inf")  # the draft-confidence gate lets every draft through to the lens rule


@pytest.fixture(scope="module")
def target(tiny_model_factory):
    return tiny_model_factory("llama", seed=0)


@pytest.fixture(scope="module")
def target_only(target):
    engine = Engine(target, None)
    return engine.run([engine.make_request(p, 20, temperature=0) for p in PROMPTS])


def exit_engine(target, draft, layers="1", threshold=early_exit.DEFAULT_THRESHOLD, diagnostic=False,
                draft_prob=None, **kw):
    """Fixed-K engine with early exit by the rule alone (the fixed policy has no cost model).
    Forced thresholds also open the draft-confidence gate, so that the lens decides alone."""
    if draft_prob is None:
        draft_prob = early_exit.DEFAULT_DRAFT_PROB if threshold == early_exit.DEFAULT_THRESHOLD else LENS_ONLY
    return Engine(target, draft, early_exit=True, exit_options={
        "layers": layers, "threshold": threshold, "diagnostic": diagnostic, "draft_prob": draft_prob}, **kw)


@pytest.mark.parametrize("layers,threshold", [("1", early_exit.DEFAULT_THRESHOLD), ("1,2", AGGRESSIVE),
                                              ("1", PRUNE_ALL), ("2", 0.0)],
                         ids=["default", "aggressive", "prune-all-first-layer", "late-layer"])
def test_greedy_identical_to_target_only(target, partial_draft_path, target_only, layers, threshold):
    engine = exit_engine(target, partial_draft_path, layers, threshold, k=4)
    reqs = [engine.make_request(p, 20, draft_len=i % 6, temperature=0) for i, p in enumerate(PROMPTS)]
    assert engine.run(reqs) == target_only  # Engine.run also checks that no KV slot leaked
    stats = engine.generator.early_exit.stats.as_dict()
    assert stats["draft_rows"] > 0
    if threshold == PRUNE_ALL:
        # Every draft row is pruned at the first exit: only d_1 is ever verified.
        assert stats["rows_pruned"] == stats["draft_rows"]
        assert engine.generator.num_drafted == engine.generator.num_verify_steps
    if threshold == AGGRESSIVE:
        assert stats["exit_ratio"] > 0.5, stats


def test_the_policy_faser_turns_early_exit_on(target, partial_draft_path, target_only):
    engine = Engine(target, partial_draft_path, policy="faser", k=4)
    assert engine.generator.early_exit is not None
    assert engine.policy.name == "faser"
    assert engine.run([engine.make_request(p, 20, temperature=0) for p in PROMPTS]) == target_only
    off = Engine(target, partial_draft_path, policy="faser", k=4, early_exit=False)
    assert off.generator.early_exit is None


def test_pruned_rows_skip_the_later_layers_and_free_their_slots(target, partial_draft_path):
    engine = exit_engine(target, partial_draft_path, "1", PRUNE_ALL, k=4)
    rows_per_layer: list[list[int]] = [[] for _ in range(engine.runner.model.num_layers)]
    for i, layer in enumerate(engine.runner.model.model.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: rows_per_layer[i].append(args[0].shape[0]))
    free_at_start = engine.runner.allocator.num_free
    req = engine.make_request(PROMPTS[0], 6, draft_len=4, temperature=0)
    # Step 1: prefill (3 rows, every layer); step 2: newest + 4 drafts verified, all pruned at
    # layer 1 but the newest token's row, which verifies d_1.
    engine.run([req])
    assert [rows[:2] for rows in rows_per_layer] == [[3, 5], [3, 1], [3, 1]]
    # Every later pass too: one row after the exit layer, whatever layer 0 saw.
    assert set(rows_per_layer[1][1:]) == set(rows_per_layer[2][1:]) == {1}
    assert engine.runner.allocator.num_free == free_at_start


def test_truncated_batch_is_the_batch_without_the_pruned_tokens():
    full = ForwardBatch.build([[1, 2, 3, 4], [7], [9, 8, 6]], [[10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32]],
                              [[0, 1, 2, 3], [0], [1, 2]])
    cut = full.truncate([2, 1, 1])
    want = ForwardBatch.build([[1, 2], [7], [9]], [[10, 11, 12, 13], [20, 21], [30]], [[0, 1], [0], []])
    for name in ("input_ids", "positions", "qo_indptr", "kv_indptr", "kv_indices", "out_cache_loc",
                 "logits_indices"):
        assert torch.equal(getattr(cut, name), getattr(want, name)), name
    with pytest.raises(ValueError, match="cannot cut"):
        full.truncate([5, 1, 1])


def test_diagnostic_mode_prunes_nothing_and_labels_predictions(target, partial_draft_path, target_only):
    engine = exit_engine(target, partial_draft_path, "1,2", AGGRESSIVE, diagnostic=True, k=4)
    assert engine.run([engine.make_request(p, 20, temperature=0) for p in PROMPTS]) == target_only
    stats = engine.generator.early_exit.stats.as_dict()
    assert stats["rows_pruned"] == 0
    for layer in (1, 2):
        s = stats["layers"][layer]
        assert s["scored"] > 0 and s["predicted"] > 0 and s["first_rejections"] > 0
        assert 0.0 <= s["precision"] <= 1.0 and 0.0 <= s["recall"] <= 1.0
    # Full depth everywhere: as many verified drafts as drafted ones.
    assert engine.generator.num_drafted == stats["draft_rows"]


def test_auto_calibration_learns_rates_per_score_cell():
    cal = early_exit.RejectionCalibration()
    prior = early_exit.RejectionCalibration.PRIOR_RATE
    assert cal.p_right(14, -3.0, 0.1, 1) == pytest.approx(prior)
    for _ in range(200):
        cal.observe(14, -3.0, 0.1, 1, True)  # unsure draft, lens against it: rejected
        cal.observe(14, 1.0, 0.95, 1, False)  # sure draft, lens agrees: accepted
    assert cal.p_right(14, -3.0, 0.1, 1) > 0.95
    assert cal.p_right(14, 1.0, 0.95, 1) < 0.05
    # A cell without labels says what its layer says (half of the prunes right here)...
    assert cal.p_right(14, -1.0, 0.5, 2) == pytest.approx(0.5, abs=0.02)
    # ... and another layer knows nothing yet.
    assert cal.p_right(21, -3.0, 0.1, 1) == pytest.approx(prior)


def test_exit_threshold_parsing():
    assert early_exit.parse_exit_threshold("auto") is None
    assert early_exit.parse_exit_threshold("-1.5") == -1.5
    with pytest.raises(ValueError, match="'auto' or a number"):
        early_exit.parse_exit_threshold("high")


def test_bad_exit_layers_are_refused():
    with pytest.raises(ValueError, match="1..2"):
        early_exit.parse_exit_layers("3", 3)
    with pytest.raises(ValueError, match="comma-separated"):
        early_exit.parse_exit_layers("half", 3)
    assert early_exit.parse_exit_layers("auto", 28) == [14, 21]


# --- sampling -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def make_exit_engine(tiny_model_factory):
    target = tiny_model_factory("llama", seed=0)
    draft = tiny_model_factory(**NOISY_DRAFT)

    def make(threshold, scheme="rejection", policy="fixed", cost_profile=None):
        return lambda: Engine(target, draft, k=2, max_running=250, sampling_scheme=scheme, early_exit=True,
                              policy=policy, cost_profile=cost_profile,
                              exit_options={"layers": "1", "threshold": threshold, "draft_prob": LENS_ONLY})
    return make


def check_with_pruning(make) -> tuple:
    """first_verification_check on engines from ``make()``, and the first engine's early-exit
    statistics, asserted to show that something was pruned: a law test of early exit in which
    nothing was pruned tests nothing about it."""
    engines = []

    def build():
        engines.append(make())
        return engines[-1]
    check = first_verification_check(build)
    stats = engines[0].generator.early_exit.stats.as_dict()
    assert stats["rows_pruned"] > 0, f"nothing was pruned: {stats}"
    return check, stats


@pytest.mark.parametrize("threshold", [0.0, PRUNE_ALL], ids=["lens", "prune-all"])
def test_rejection_sampling_keeps_the_target_law(make_exit_engine, threshold):
    check, _ = check_with_pruning(make_exit_engine(threshold))
    assert check.pvalue_first > 1e-3, check
    assert check.pvalue > 1e-3, check


# A pass of 250 requests costs mostly its fixed part, so the faser policy drafts.
FASER_PROFILE = "target=3000+5,draft=10+0.1"


def trust_the_lens(calibration: early_exit.RejectionCalibration, layer: int = 1, weight: int = 300) -> None:
    """A history in which the lens was always right at ``layer``: a draft token it scored well
    below an alternative was rejected, one it scored above every alternative was accepted.
    The calibration then trusts prunes of exactly the tokens the lens dislikes: its chance
    depends on the token, the case where a prune rule that looks ahead would bias the law."""
    for j in (1, 2, 3):
        for prob in (0.1, 0.3, 0.5, 0.7, 0.9):
            for _ in range(weight):
                calibration.observe(layer, -3.0, prob, j, True)
                calibration.observe(layer, 1.0, prob, j, False)


@pytest.mark.parametrize("sure", [False, True], ids=["lens-trusting-calibration", "overconfident"])
def test_faser_policy_with_auto_threshold_keeps_the_target_law(make_exit_engine, sure):
    """The whole `faser` policy: per-request lengths, the auto threshold calibrated online, and
    pruning decided by the cost model, under rejection sampling.  The calibration starts from a
    history that trusts the lens (``trust_the_lens``), so what is pruned depends on the draft
    tokens' own scores, and goes on learning online.  Overconfident: the calibration claims
    every prune is right with chance 0.99 (about half are wrong here), so the cost model prunes
    nearly every draft at the first exit; the law must not notice."""
    make = make_exit_engine(None, policy="faser", cost_profile=FASER_PROFILE)

    def build():
        engine = make()
        if sure:
            engine.generator.early_exit.calibration.p_right = lambda *score: 0.99
        else:
            trust_the_lens(engine.generator.early_exit.calibration)
        return engine
    check, stats = check_with_pruning(build)
    assert check.pvalue_first > 1e-3, check
    assert check.pvalue > 1e-3, check
    if sure:
        assert stats["rows_pruned"] > 0.5 * stats["draft_rows"], stats


class _PricedRows:
    """A cost model for the fixed policy's early exit: a target row costs ROW_S at full depth."""
    ROW_S = 3e-3

    def __init__(self):
        self.target_cost = CostCurve(0.0, self.ROW_S)


def test_a_prune_chosen_by_later_tokens_is_caught(tiny_model_factory):
    """Issue 24, defect 1.  Draft = target (p = q: every tested draft is accepted), k = 2, one
    exit layer of three, a cost model, and a calibration that trusts a prune at d_2 exactly
    when the draft gave d_2 a low probability.  Prices: a row saves ROW_S * 2/3 (u); a token
    costs 2u; p_right(d_1) = 0.55 makes pruning at d_1 worth 0.47u, at d_2 u (low-probability
    d_2) or -u (likely d_2).  Choosing the best j looks at d_2: likely tokens are dropped and
    redrawn, unlikely ones are tested and kept, so unlikely tokens come out too often.  The
    stopping rule (prune at the first j that pays) prunes at d_1 whatever d_2 is."""
    target = tiny_model_factory("llama", seed=0)
    engines = []
    u = _PricedRows.ROW_S * 2 / 3

    def p_right(layer, margin, prob, j):
        if j == 1:
            return 0.55
        return 1.0 if prob < LOW_DRAFT_PROB else 0.0

    def build():
        engine = Engine(target, target, k=2, max_running=250, early_exit=True,
                        exit_options={"layers": "1", "threshold": None})
        verifier = engine.generator.early_exit
        verifier.cost_model = _PricedRows()
        verifier.calibration.p_right = p_right
        engine.generator._seconds_per_token = lambda *args: 2 * u
        engines.append(engine)
        return engine
    check = first_verification_check(build)
    stats = engines[0].generator.early_exit.stats.as_dict()
    assert stats["rows_pruned"] > 0, stats  # the mechanism acted
    assert check.pvalue_first > 1e-3, check
    assert check.pvalue > 1e-3, check


def test_the_prune_position_is_a_stopping_time():
    """Whether the choice stops at j may depend on positions 1..j only: changing the scores of
    later positions, or the rows an earlier exit layer's prune left, never moves a choice that
    falls at or before j.  (The best-saving rule fails the first, pricing by the rows left the
    second.)"""
    import random
    from types import SimpleNamespace

    runner = SimpleNamespace(model=SimpleNamespace(num_layers=4))
    for auto in (True, False):
        verifier = early_exit.EarlyExitVerifier(
            runner, early_exit.ExitConfig([2], None if auto else 0.0), predictor=object(),
            cost_model=SimpleNamespace(target_cost=CostCurve(0.01, 0.002)))
        verifier._seconds_per_token = 0.004
        rng = random.Random(0)
        for _ in range(2000):
            k = rng.randint(2, 6)
            right = [rng.random() for _ in range(k)]
            flags = [rng.random() < 0.5 for _ in range(k)]
            v = early_exit.Verification(0, k, torch.zeros(k, 1, dtype=torch.long), accept_rate=rng.random())
            choice = verifier._choose_prune(2, v, flags, right, 40)
            j = rng.randint(1, k - 1)
            later = right[:j] + [rng.random() for _ in range(k - j)]
            later_flags = flags[:j] + [rng.random() < 0.5 for _ in range(k - j)]
            other = verifier._choose_prune(2, v, later_flags, later, 40)
            if choice is not None and choice <= j or other is not None and other <= j:
                assert choice == other, (right, later, flags, later_flags, j)
            # The same request after an earlier layer pruned it at some m > j: its positions
            # up to j are decided as if it had not been.
            m = rng.randint(j + 1, k)
            cut = early_exit.Verification(0, k, v.candidates, verified=m, bonus=False, accept_rate=v.accept_rate)
            again = verifier._choose_prune(2, cut, flags[:m], right[:m], 40 - v.rows + cut.rows)
            if choice is not None and choice <= j or again is not None and again <= j:
                assert choice == again, (right, flags, j, m)


# The draft's probability below which the calibration above trusts a prune at d_2: about half
# of the tiny model's sampled tokens (top_k 5) fall on each side.
LOW_DRAFT_PROB = 0.025


def test_coupled_sampling_keeps_the_target_law(make_exit_engine):
    check, _ = check_with_pruning(make_exit_engine(0.0, "coupled"))
    assert check.pvalue_first > 1e-3, check
    assert check.pvalue > 1e-3, check


def test_check_sees_resampling_in_place_of_a_pruned_token(make_exit_engine, monkeypatch):
    """The tempting rule "a pruned token was never drafted: sample the target there instead"
    is not lossless under rejection sampling when the prune depends on the token, as a lens
    prediction does.  The same check must see it."""
    real = SpeculativeGenerator._accept

    def resample_instead(self, req, draft, logits, q_rows, bonus=True):
        if bonus or not draft:
            return real(self, req, draft, logits, q_rows, bonus)
        return real(self, req, draft[:-1], logits, q_rows, True)

    monkeypatch.setattr(SpeculativeGenerator, "_accept", resample_instead)
    check = first_verification_check(make_exit_engine(0.0))
    assert check.pvalue < 1e-6, f"resampling pruned positions went unnoticed ({check})"


# --- through the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faser_server(target, partial_draft_path, tmp_path_factory):
    from server_utils import start_server

    # Fixed K with early exit switched on by flag, pruning by the rule alone (no cost model):
    # the aggressive lens threshold with the confidence gate open prunes most drafts.
    server = start_server(target, tmp_path_factory.mktemp("faser"), [
        "--max-total-tokens", "2048", "--enable-metrics", "--speculative-policy", "fixed",
        "--faser-early-exit", "--faser-exit-draft-prob", "inf",
        "--speculative-draft-model-path", partial_draft_path, "--speculative-num-draft-tokens", "4",
        "--faser-exit-threshold", str(AGGRESSIVE)])
    yield server
    server.stop()


def test_faser_server_is_lossless_and_reports_early_exit(faser_server, target):
    import requests

    from reference import hf_greedy, load_hf_model
    from test_metrics import scrape

    hf = load_hf_model(target)
    before = scrape(faser_server)
    for prompt in ([5, 17, 33], list(range(40, 70)), [3, 9]):
        r = requests.post(f"{faser_server.base_url}/generate", timeout=120, json={
            "input_ids": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}})
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == hf_greedy(hf, prompt, 16)
    state = faser_server.wait_kv_free()
    assert state["kv_used_slots"] == 0
    assert state["speculative_policy"] == "fixed"
    exits = state["spec_early_exit"]
    assert exits["rows_pruned"] > 0 and "1" in exits["layers"], exits
    pruned = scrape(faser_server)["faser:spec_early_exited_tokens_total"] - \
        before["faser:spec_early_exited_tokens_total"]
    assert pruned > 0
    # The load harness reads the same figures per run (its report's "Early exit" section).
    from faser_sgl.bench.runner import server_counters

    counters = server_counters(faser_server.base_url)
    assert counters["exit_rows_pruned"] == exits["rows_pruned"] > 0
    # Fixed K has no cost model to say a prune cannot pay: every drafting step is scored.
    assert counters["exit_scored_steps"] > 0 and counters["exit_unscored_steps"] == 0, counters


def test_early_exit_options():
    from test_adaptive_policy import _options

    faser = _options("--speculative-policy", "faser", "--speculative-draft-model-path", "/d")
    assert faser.early_exit_on and faser.exit_layers == "auto"
    off = _options("--speculative-policy", "faser", "--speculative-draft-model-path", "/d", "--no-faser-early-exit")
    assert not off.early_exit_on
    fixed = _options("--speculative-policy", "fixed", "--speculative-draft-model-path", "/d", "--faser-early-exit",
                     "--faser-exit-layers", "10,20", "--faser-exit-threshold", "1.5")
    assert fixed.early_exit_on and fixed.exit_layers == "10,20" and fixed.exit_threshold == 1.5
    assert faser.exit_threshold is None  # auto
    with pytest.raises(SystemExit, match="faser-exit-threshold"):
        _options("--speculative-policy", "faser", "--speculative-draft-model-path", "/d", "--faser-exit-threshold", "x")
    with pytest.raises(SystemExit, match="needs a speculative policy"):
        _options("--faser-early-exit")
    with pytest.raises(SystemExit, match="faser-exit-layers"):
        _options("--speculative-policy", "faser", "--speculative-draft-model-path", "/d", "--faser-exit-layers", "x")


def test_cost_model_prunes_only_where_rows_are_dear(target, partial_draft_path, target_only):
    """Same rule, same drafts: with GPU-like costs (a row is nearly free) no predicted rejection
    is worth a lost token; where every target row costs a lot, they are pruned."""
    from faser_sgl.speculative.adaptive import AdaptiveLength, parse_cost_profile

    pruned = {}
    for name, profile in (("gpu", "target=30+0.01,draft=2+0.01"), ("dear-rows", "target=1+50,draft=1+0.1")):
        engine = exit_engine(target, partial_draft_path, "1,2", AGGRESSIVE, k=4)
        engine.generator.early_exit.cost_model = AdaptiveLength(4, parse_cost_profile(profile))
        reqs = [engine.make_request(p, 20, temperature=0) for p in PROMPTS]
        assert engine.run(reqs) == target_only
        stats = engine.generator.early_exit.stats.as_dict()
        assert stats["layers"][1]["scored"] > 0
        pruned[name] = stats["rows_pruned"]
    assert pruned["gpu"] == 0 and pruned["dear-rows"] > 0, pruned


def test_unseen_rejection_is_the_calibrated_chance_of_the_first_hidden_draft():
    from types import SimpleNamespace

    verifier = early_exit.EarlyExitVerifier(SimpleNamespace(model=SimpleNamespace(num_layers=3)),
                                            early_exit.ExitConfig([1], 0.0), predictor=object())
    for _ in range(100):  # the lens's verdict is right at layer 1 (even with a fixed threshold)
        verifier.calibration.observe(1, -3.0, 0.1, 2, True)
        verifier.calibration.observe(1, 1.0, 0.9, 2, False)
    v = early_exit.Verification(0, 3, torch.zeros(3, 1, dtype=torch.long), verified=1, bonus=False, pruned_at=1,
                                draft_probs=[0.9, 0.1, 0.5])
    v.margins_at[1] = [1.0, -3.0, 0.0]
    assert verifier.unseen_rejection(v, accepted=1) == pytest.approx(verifier.calibration.p_right(1, -3.0, 0.1, 2))
    assert verifier.unseen_rejection(v, accepted=1) > 0.9
    assert verifier.unseen_rejection(v, accepted=0) is None  # d_1 rejected: nothing was hidden
    whole = early_exit.Verification(0, 3, v.candidates, verified=3, bonus=False, pruned_at=1)
    whole.margins_at[1] = [1.0, 1.0, 1.0]
    assert verifier.unseen_rejection(whole, accepted=3) is None  # only the bonus row was dropped
    kept = early_exit.Verification(0, 3, v.candidates)
    assert verifier.unseen_rejection(kept, accepted=3) is None  # nothing pruned


class StepTimedEngine(Engine):
    """Tells the generator each step's wall time, as the scheduler does (observe_step): that is
    where early exit learns what scoring a step costs."""

    def step(self):
        start = time.perf_counter()
        done = super().step()
        self.generator.observe_step(len(self.planner.running) or 1, time.perf_counter() - start)
        return done


def test_steps_go_unscored_where_no_prune_can_pay(target, partial_draft_path, target_only):
    """Nearly free target rows (GPU-like costs): after the first scored step has measured what
    scoring costs, no prune can save that much, so drafts are scored only on probes; no
    candidates are gathered and no pass is cut for the others.  Where rows are dear, every
    drafting step is scored and rows are pruned.  Output is target-only's either way."""
    from faser_sgl.speculative.adaptive import AdaptiveLength, parse_cost_profile

    seen = {}
    for name, profile in (("cheap-rows", "target=30+0.0001,draft=2+0.01"), ("dear-rows", "target=1+50,draft=1+0.1")):
        engine = StepTimedEngine(target, partial_draft_path, k=4, early_exit=True, exit_options={
            "layers": "1,2", "threshold": AGGRESSIVE, "diagnostic": False, "draft_prob": LENS_ONLY})
        verifier = engine.generator.early_exit
        verifier.cost_model = AdaptiveLength(4, parse_cost_profile(profile))
        reqs = [engine.make_request(p, 40, temperature=0) for p in PROMPTS]
        assert [o[:20] for o in engine.run(reqs)] == target_only
        stats = verifier.stats.as_dict()
        seen[name] = stats
        assert stats["scored_steps"] >= 1 and verifier.scoring_cost.measured
        if name == "cheap-rows":
            assert stats["unscored_steps"] > stats["scored_steps"] > 0, stats
            assert stats["probe_steps"] >= 1, stats  # scored anyway, once every PROBE_EVERY
            assert stats["rows_pruned"] == 0
            # Only the scored steps' drafts entered a scored verification pass.
            assert stats["draft_rows"] < engine.generator.num_drafted
        else:
            assert stats["unscored_steps"] == 0 and stats["probe_steps"] == 0, stats
            assert stats["rows_pruned"] > 0
    assert seen["cheap-rows"]["draft_rows"] < seen["dear-rows"]["draft_rows"]


def test_scoring_stops_where_prunes_could_pay_but_none_happen(target, partial_draft_path, target_only):
    """Dear target rows, so a prune could pay, but a threshold at which nothing is ever pruned:
    the share of scored rows pruned falls from its prior towards 0, and drafting steps go
    unscored apart from probes (on the embedded pair's CPU steps not one row of 1,767 scored
    was pruned in a load run, while every scored step paid for scoring)."""
    from faser_sgl.speculative.adaptive import AdaptiveLength, parse_cost_profile

    engine = StepTimedEngine(target, partial_draft_path, k=4, early_exit=True, exit_options={
        "layers": "1,2", "threshold": 1e9, "diagnostic": False, "draft_prob": LENS_ONLY})
    verifier = engine.generator.early_exit
    verifier.cost_model = AdaptiveLength(4, parse_cost_profile("target=1+2,draft=1+0.1"))
    prior_share = verifier.prune_share()
    reqs = [engine.make_request(p, 40, temperature=0) for p in PROMPTS]
    assert [o[:20] for o in engine.run(reqs)] == target_only
    stats = verifier.stats.as_dict()
    assert stats["rows_pruned"] == 0 and stats["scored_steps"] >= 1
    assert verifier.prune_share() < prior_share / 4
    assert stats["unscored_steps"] > 0, stats


def test_scoring_is_kept_out_of_the_target_pass_cost(target, partial_draft_path):
    """The seconds spent deciding at exit layers are taken out of the verification pass's time
    (the target's cost curve prices layers only) and handed to the step's scoring cost."""
    engine = exit_engine(target, partial_draft_path, "1,2", AGGRESSIVE, k=4)
    gen = engine.generator
    passes = []
    gen.on_pass = lambda model, tokens, seconds: passes.append((model, seconds))
    real_decide = gen.early_exit._decide

    def slow_decide(*args):
        time.sleep(0.05)
        return real_decide(*args)

    gen.early_exit._decide = slow_decide
    taken = []
    real_take = gen.early_exit.take_scoring_seconds
    gen.early_exit.take_scoring_seconds = lambda: taken.append(real_take()) or taken[-1]
    engine.run([engine.make_request(PROMPTS[0], 6, temperature=0)])
    target_passes = [s for m, s in passes if m == "target"]
    # Two exit layers, 50 ms each: a scored verification would read >= 100 ms with them in.
    assert gen.num_verify_steps > 0 and max(target_passes) < 0.1, target_passes
    assert taken and min(taken) >= 0.1, taken  # one figure per scored verification pass
