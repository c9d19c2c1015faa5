"""Sampled speculative decoding follows the target's distribution, checked end to end through the
engine (tests/spec_harness.Engine) on ONE verification step, with a test that has the power to
see a wrong accept rule or a wrong residual.

The first output token comes from the prefill (target only); with ``max_new_tokens = k + 2`` the
next step drafts exactly k tokens and its verification emits tokens 2..k+2.  The joint law of
tokens 2..k+1 (verified positions 1..k) given token 1 is compared with the target's exact
probabilities (target forward passes + the sampler's transforms) by a Pearson chi-square test
stratified by token 1, so every request counts.  The draft is the target with 5% relative weight
noise: at top_k=5 their supports overlap but differ, about 40% of the drafts are rejected, and the
residual norm(max(p - q, 0)) decides much of what comes out.

Controls inject wrong kernels (kernels/accept_reject.py's ``accept_mask`` / ``residual_weights``)
and run the same engine path: the same check must then reject by a wide margin.

``first_verification_check(make_engine, ...)`` is the reusable part: any engine factory (another
sampling scheme, another draft) gets the same check.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from spec_harness import Engine

# Draft = target with 5% relative weight noise (see tiny_model.build_tiny_model).
NOISY_DRAFT = {"arch": "llama", "seed": 0, "noise_std": 0.05, "noise_seed": 1}
PROMPT = [11, 12, 13]
PARAMS = {"temperature": 1.0, "top_k": 5}
K = 2
N = 1500


# --- reusable statistics ----------------------------------------------------------------------

def chi2_sf(stat: float, dof: int) -> float:
    """P(chi2_dof >= stat)."""
    if dof <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def stratified_chi2(strata: dict, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson chi-square summed over independent strata.

    strata: {key: (Counter of observed outcomes, {outcome: exact probability})}.  Within a
    stratum, outcomes with expected count < min_expected are pooled into one bin, which also takes
    every observed outcome the exact law does not list (probability 0).  Returns (statistic,
    degrees of freedom); the statistic is inf when an impossible outcome was observed.
    """
    stat, dof = 0.0, 0
    for observed, probs in strata.values():
        n = sum(observed.values())
        if n == 0:
            continue
        bins = []
        pooled_o = sum(c for o, c in observed.items() if o not in probs)
        pooled_e = 0.0
        for outcome, p in probs.items():
            o, e = observed.get(outcome, 0), p * n
            if e >= min_expected:
                bins.append((o, e))
            else:
                pooled_o += o
                pooled_e += e
        if pooled_o or pooled_e:
            if pooled_e <= 1e-9 and pooled_o > 0:  # an outcome the target cannot produce
                return float("inf"), max(dof, 1)
            if pooled_e >= 1e-9:
                bins.append((pooled_o, pooled_e))
        stat += sum((o - e) ** 2 / e for o, e in bins)
        dof += len(bins) - 1
    return stat, dof


def target_probs(engine: Engine, seq: list[int], prompt_len: int, params: dict) -> torch.Tensor:
    """The target's next-token distribution after seq, with the request's sampling transforms."""
    from faser_sgl.executor.forward_batch import ForwardBatch

    runner = engine.runner
    slots = runner.allocator.alloc(len(seq))
    try:
        logits = runner.forward(ForwardBatch.build([seq], [slots], [[len(seq) - 1]]))
    finally:
        runner.allocator.free(slots)
    opts = engine.make_request(seq, 1, **params).sampling
    return engine.sampler.probs(logits, [opts], [seq[prompt_len:]])[0].to(torch.float64)


def target_joint(engine: Engine, prefix: list[int], prompt_len: int, params: dict, depth: int) -> dict:
    """Exact law of the next ``depth`` tokens after prefix: {tuple of tokens: probability}
    (enumerates the support tree, so keep the support small with top_k / top_p)."""
    if depth == 0:
        return {(): 1.0}
    p = target_probs(engine, prefix, prompt_len, params)
    out = {}
    for t in torch.nonzero(p).flatten().tolist():
        for rest, pr in target_joint(engine, prefix + [t], prompt_len, params, depth - 1).items():
            out[(t,) + rest] = float(p[t]) * pr
    return out


@dataclass
class SamplingCheck:
    pvalue: float  # joint of tokens 2..k+1 (verified positions 1..k) given token 1
    pvalue_first: float  # token 2 alone (verified position 1) given token 1
    num_drafted: int
    num_accepted: int
    chi2: tuple[float, int] = (0.0, 0)  # (statistic, dof) behind pvalue; inf: an impossible outcome
    outputs: list = field(repr=False, default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.num_accepted / max(self.num_drafted, 1)


def first_verification_check(make_engine, prompt: list[int] = PROMPT, params: dict | None = None,
                             n: int = N, seed: int = 1000) -> SamplingCheck:
    """Run n seeded requests through ``make_engine()`` (a speculative Engine; its
    num_draft_tokens is k) and test tokens 2..k+1 of each output against the target's exact law
    given token 1.  Request i uses sampling_seed = seed + i, so results are deterministic."""
    params = dict(PARAMS if params is None else params)
    engine = make_engine()
    # Every request's first decode step verifies drafts (the draft catches up on all prompts in
    # one pass, and decodes draft beside newcomers' prefills), so that tokens 2..k+1 of every
    # request come from a verification: the test's power rests on it.
    engine.generator.MIN_CATCH_UP_TOKENS = 1 << 20
    engine.generator.DRAFT_BESIDE_PREFILL = True
    k = engine.num_draft_tokens
    reqs = [engine.make_request(prompt, k + 2, sampling_seed=seed + i, **params) for i in range(n)]
    outs = engine.run(reqs)
    assert all(len(o) == k + 2 for o in outs)
    gen = engine.generator

    by_first: dict[int, list] = {}
    for o in outs:
        by_first.setdefault(o[0], []).append(tuple(o[1:k + 1]))
    p1 = target_probs(engine, prompt, len(prompt), params)
    joint, first = {}, {}
    for x1, rests in by_first.items():
        if float(p1[x1]) == 0.0:  # the prefill itself produced an impossible token
            return SamplingCheck(0.0, 0.0, gen.num_drafted, gen.num_accepted, (float("inf"), 1), outs)
        law = target_joint(engine, prompt + [x1], len(prompt), params, k)
        joint[x1] = (Counter(rests), law)
        marginal = Counter()
        for seq, pr in law.items():
            marginal[seq[:1]] += pr
        first[x1] = (Counter(r[:1] for r in rests), dict(marginal))
    stat = stratified_chi2(joint)
    pv_first = chi2_sf(*stratified_chi2(first))
    return SamplingCheck(chi2_sf(*stat), pv_first, gen.num_drafted, gen.num_accepted, stat, outs)


# --- tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def make_engine(tiny_model_factory):
    target = tiny_model_factory("llama", seed=0)
    draft = tiny_model_factory(**NOISY_DRAFT)
    return lambda: Engine(target, draft, k=K, max_running=250)


def test_rejection_sampling_matches_target_distribution(make_engine):
    check = first_verification_check(make_engine)
    assert 0.3 <= check.acceptance <= 0.9, f"need partial acceptance, got {check.acceptance:.3f}"
    assert check.pvalue_first > 1e-3, f"verified position 1 differs from the target ({check})"
    assert check.pvalue > 1e-3, f"joint of verified positions 1..{K} differs from the target ({check})"


def _accept_ignoring_q(u, q_x, p_x):
    return u < p_x  # accept with probability p(x) instead of min(1, p(x) / q(x))


def _accept_always(u, q_x, p_x):
    return torch.ones_like(p_x, dtype=torch.bool)


def _residual_is_p(p, q):
    return p  # resample from p instead of norm(max(p - q, 0)) after a rejection


@pytest.mark.parametrize("name,wrong", [("accept_mask", _accept_ignoring_q), ("accept_mask", _accept_always),
                                        ("residual_weights", _residual_is_p)],
                         ids=["accept-ignores-q", "accept-always", "residual-is-p"])
def test_check_rejects_wrong_kernels(make_engine, monkeypatch, name, wrong):
    """The same check, through the same engine path, with one piece of the kernel broken."""
    from faser_sgl import kernels
    from faser_sgl.kernels import accept_reject

    monkeypatch.setattr(kernels, "_use_triton", lambda tensor: False)  # the patched reference runs
    monkeypatch.setattr(accept_reject, name, wrong)
    check = first_verification_check(make_engine)
    assert check.pvalue < 1e-6, f"a wrong {name} went unnoticed ({check})"


# --- coupled sampling (faser_sgl/kernels/coupled.py) -------------------------------------------

@pytest.fixture(scope="module")
def make_coupled_engine(tiny_model_factory):
    target = tiny_model_factory("llama", seed=0)
    draft = tiny_model_factory(**NOISY_DRAFT)
    return lambda: Engine(target, draft, k=K, max_running=250, sampling_scheme="coupled")


def test_coupled_sampling_matches_target_distribution(make_coupled_engine):
    check = first_verification_check(make_coupled_engine)
    assert 0.3 <= check.acceptance <= 0.9, f"need partial acceptance, got {check.acceptance:.3f}"
    assert check.pvalue_first > 1e-3, f"verified position 1 differs from the target ({check})"
    assert check.pvalue > 1e-3, f"joint of verified positions 1..{K} differs from the target ({check})"


def test_check_rejects_noise_shared_between_positions(make_coupled_engine, monkeypatch):
    """Coupling is lossless only because each position has fresh noise: reusing one noise vector
    for every position of a request (a plausible bug: keying by seed alone) must be seen."""
    from faser_sgl.kernels import coupled

    real = coupled.gumbel_noise
    monkeypatch.setattr(coupled, "gumbel_noise", lambda seed, position, vocab, device: real(seed, 0, vocab, device))
    check = first_verification_check(make_coupled_engine)
    assert check.pvalue < 1e-6, f"noise shared between positions went unnoticed ({check})"
