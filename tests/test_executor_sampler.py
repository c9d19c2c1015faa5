"""Sampler semantics against SGLang 0.5.23's definitions (worked out by hand here: importing
sglang's sampler takes seconds and pulls CUDA-oriented modules)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from faser_sgl.executor.sampler import (
    TOP_K_ALL,
    Sampler,
    SamplingOptions,
    filter_probs,
    sample_from_probs,
)

sampler = Sampler()


def logits_for(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


# ----- greedy ------------------------------------------------------------------------------

def test_greedy_is_argmax_and_temperature_zero_means_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingOptions(temperature=0.0)
    assert greedy.is_greedy and greedy.top_k == 1 and greedy.temperature == 1.0
    assert torch.equal(sampler.sample(logits, [greedy] * 6), logits.argmax(-1))
    assert SamplingOptions(top_k=1, temperature=0.8).is_greedy
    # Mixed batch: greedy rows stay argmax next to sampled rows.
    hot = SamplingOptions(temperature=1.0, seed=1)
    opts = [greedy, hot, greedy, hot, greedy, hot]
    out = sampler.sample(logits, opts)
    assert torch.equal(out[0::2], logits[0::2].argmax(-1))
    probs = sampler.probs(logits, opts)
    assert torch.equal(probs[0], torch.nn.functional.one_hot(logits[0].argmax(), 50).float())
    assert torch.allclose(probs[1], torch.softmax(logits[1], -1))


def test_greedy_uses_penalised_logits():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    opts = SamplingOptions(temperature=0.0, repetition_penalty=2.0)
    assert sampler.sample(logits, [opts], [[]]).item() == 0
    assert sampler.sample(logits, [opts], [[0]]).item() == 1  # 5 / 2 < 4


# ----- filtering ---------------------------------------------------------------------------

P = [0.5, 0.25, 0.15, 0.1]


def filtered(**kw) -> torch.Tensor:
    return sampler.probs(logits_for(P), [SamplingOptions(**kw)])[0]


def renorm(keep: list[int]) -> torch.Tensor:
    p = torch.tensor(P)
    out = torch.zeros(4)
    out[keep] = p[keep] / p[keep].sum()
    return out


@pytest.mark.parametrize("kw, keep", [
    ({}, [0, 1, 2, 3]),
    ({"top_k": 2}, [0, 1]),
    ({"top_k": 3}, [0, 1, 2]),
    ({"top_k": -1}, [0, 1, 2, 3]),
    # top-p keeps a token while the mass before it is <= top_p.
    ({"top_p": 0.3}, [0]),
    ({"top_p": 0.7}, [0, 1]),
    ({"top_p": 0.8}, [0, 1, 2]),
    # min-p drops tokens below min_p * max prob (0.5).
    ({"min_p": 0.4}, [0, 1]),
    ({"min_p": 0.25}, [0, 1, 2]),
    ({"top_k": 3, "top_p": 0.7}, [0, 1]),
    ({"top_k": 3, "min_p": 0.25}, [0, 1, 2]),
])
def test_filters_zero_the_right_tokens(kw, keep):
    assert torch.allclose(filtered(**kw), renorm(keep), atol=1e-6)


def test_filters_apply_after_temperature():
    # At T=2 the distribution flattens: sqrt-probs -> 0.5 becomes the max of a flatter curve.
    got = filtered(temperature=2.0, top_p=0.5)
    flat = torch.tensor(P).sqrt() / torch.tensor(P).sqrt().sum()  # ~[.36, .26, .20, .16]
    keep = [0, 1]  # mass before token 2 is ~0.62 > 0.5
    want = torch.zeros(4)
    want[keep] = flat[keep] / flat[keep].sum()
    assert torch.allclose(got, want, atol=1e-6)


def test_filter_probs_rows_have_their_own_parameters():
    probs = torch.tensor([P, P, P])
    out = filter_probs(probs, top_k=torch.tensor([1, 4, 4]), top_p=torch.tensor([1.0, 0.3, 1.0]),
                       min_p=torch.tensor([0.0, 0.0, 0.4]))
    assert torch.allclose(out, torch.stack([renorm([0]), renorm([0]), renorm([0, 1])]), atol=1e-6)


# ----- penalties ---------------------------------------------------------------------------

def test_penalties_follow_sglang():
    logits = torch.tensor([[3.0, -2.0, 1.0, 0.5, 2.0, -1.0]])
    history = [0, 0, 1, 4]  # token 0 twice, 1 and 4 once
    opts = SamplingOptions(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0)
    got = sampler.adjusted_logits(logits, [opts], [history])[0]
    # Additive first: logit - 0.5 * count - 0.25 * occurred; then repetition on occurred tokens:
    # positive / 2, negative * 2.
    want = torch.tensor([
        (3.0 - 1.0 - 0.25) / 2,  # 0.875
        (-2.0 - 0.5 - 0.25) * 2,  # -5.5
        1.0, 0.5,  # never output: untouched
        (2.0 - 0.5 - 0.25) / 2,  # 0.625
        -1.0,
    ])
    assert torch.allclose(got, want)


def test_penalties_use_output_tokens_only_and_each_row_its_own_history():
    logits = torch.zeros(2, 5) + 1.0
    opts = SamplingOptions(presence_penalty=1.0, repetition_penalty=1.5)
    # Two rows of the same request (as in verification): histories differ per row.
    got = sampler.adjusted_logits(logits, [opts, opts], [[2], [2, 3]])
    assert torch.allclose(got[0], torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(got[1], torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]))
    # Prompt tokens are never penalised (SGLang's penalisers only see output ids).
    probs = sampler.probs(logits[:1], [opts], [[]], prompt_ids=[[0, 1, 2]])
    assert torch.allclose(probs, torch.full((1, 5), 0.2))


def test_min_new_tokens_masks_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 9.0, 1.0, 8.0]])
    opts = SamplingOptions(temperature=0.0, min_new_tokens=2, stop_token_ids=(1, 3))
    assert sampler.sample(logits, [opts], [[]]).item() == 2
    assert sampler.sample(logits, [opts], [[2]]).item() == 2
    assert sampler.sample(logits, [opts], [[2, 2]]).item() == 1
    probs = sampler.probs(logits, [SamplingOptions(min_new_tokens=1, stop_token_ids=(1, 3))], [[]])
    assert probs[0, 1] == 0 and probs[0, 3] == 0 and math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)


def test_logit_bias_added_after_penalties():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    opts = SamplingOptions(repetition_penalty=2.0, logit_bias={"1": 5.0, 2: -1.0})
    got = sampler.adjusted_logits(logits, [opts], [[1]])[0]
    assert torch.allclose(got, torch.tensor([2.0, 1.0 / 2 + 5.0, -1.0]))
    assert sampler.sample(logits, [SamplingOptions(temperature=0, logit_bias={2: 10.0})], [[]]).item() == 2


def test_no_adjustment_returns_logits_unchanged():
    logits = torch.randn(3, 7)
    assert torch.equal(sampler.adjusted_logits(logits, [SamplingOptions()] * 3, None), logits)


# ----- randomness --------------------------------------------------------------------------

def test_same_seed_same_samples_different_seed_differs():
    logits = torch.zeros(1, 1000)  # uniform: every draw is informative

    def draws(seed):
        opts = SamplingOptions(temperature=1.0, seed=seed)
        return [sampler.sample(logits, [opts]).item() for _ in range(20)]

    assert draws(1234) == draws(1234)
    assert draws(1234) != draws(99)
    # A seeded request draws the same token whatever shares its batch.
    alone = sampler.sample(logits, [SamplingOptions(seed=5)]).item()
    mixed = sampler.sample(logits.expand(2, -1), [SamplingOptions(seed=6), SamplingOptions(seed=5)])
    assert mixed[1].item() == alone


def test_unseeded_requests_follow_the_global_seed():
    logits = torch.zeros(1, 1000)
    torch.manual_seed(0)
    a = sampler.sample(logits, [SamplingOptions()]).item()
    torch.manual_seed(0)
    b = sampler.sample(logits, [SamplingOptions()]).item()
    assert a == b


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability zero"
    return (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum().item()


@pytest.mark.parametrize("kw", [{"temperature": 0.7}, {"temperature": 1.5, "top_k": 4}, {"top_p": 0.8}])
def test_empirical_distribution_matches(kw):
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    opts = SamplingOptions(seed=2024, **kw)
    n = 20000
    want = sampler.probs(logits, [opts])[0]
    if "temperature" in kw and len(kw) == 1:
        assert torch.allclose(want, torch.softmax(logits[0] / kw["temperature"], -1))
    tokens = sampler.sample(logits.expand(n, -1), [opts] * n)
    counts = torch.bincount(tokens, minlength=6).float()
    dof = int((want > 0).sum()) - 1
    # chi-square 99.9% quantile for <= 5 degrees of freedom is <= 20.5
    assert chi_square(counts, want) < 20.5, (counts / n, want, dof)


def test_sample_from_probs_inverse_cdf():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.2, 0.0, 0.8, 0.0]])
    assert sample_from_probs(probs, torch.tensor([0.0, 0.0])).tolist() == [1, 0]
    assert sample_from_probs(probs, torch.tensor([0.49, 0.21])).tolist() == [1, 2]
    assert sample_from_probs(probs, torch.tensor([0.5, 0.999999])).tolist() == [3, 2]


# ----- construction from sglang's SamplingParams -------------------------------------------

def sglang_like(**kw):
    """The attributes of an sglang SamplingParams after its __post_init__ normalisation."""
    base = dict(temperature=1.0, top_p=1.0, top_k=TOP_K_ALL, min_p=0.0, frequency_penalty=0.0,
                presence_penalty=0.0, repetition_penalty=1.0, min_new_tokens=0, logit_bias=None,
                sampling_seed=None, stop_token_ids=None)
    return SimpleNamespace(**{**base, **kw})


def test_from_sglang():
    o = SamplingOptions.from_sglang(sglang_like(temperature=1.0, top_k=1), 100, eos_ids=[2])
    assert o.is_greedy
    o = SamplingOptions.from_sglang(sglang_like(temperature=0.0, top_k=-1), 100)  # not normalised yet
    assert o.is_greedy
    o = SamplingOptions.from_sglang(
        sglang_like(temperature=0.7, top_p=0.9, min_p=0.05, top_k=-1, frequency_penalty=0.3,
                    presence_penalty=-0.2, repetition_penalty=1.1, min_new_tokens=3,
                    logit_bias={"5": 2.5}, sampling_seed=7, stop_token_ids={9}),
        vocab_size=100, eos_ids=[2, 3])
    assert (o.temperature, o.top_p, o.min_p, o.top_k) == (0.7, 0.9, 0.05, TOP_K_ALL)
    assert (o.frequency_penalty, o.presence_penalty, o.repetition_penalty) == (0.3, -0.2, 1.1)
    assert o.min_new_tokens == 3 and o.stop_token_ids == (2, 3, 9)
    assert o.logit_bias == {5: 2.5} and o.seed == 7 and not o.is_greedy
    # None values mean defaults, as in sglang.
    o = SamplingOptions.from_sglang(SimpleNamespace(temperature=None, top_p=None), 100)
    assert (o.temperature, o.top_p, o.top_k) == (1.0, 1.0, TOP_K_ALL)
    with pytest.raises(ValueError):
        SamplingOptions.from_sglang(sglang_like(top_p=0.0), 100)
    with pytest.raises(ValueError):
        SamplingOptions.from_sglang(sglang_like(logit_bias={"100": 1.0}), 100)
