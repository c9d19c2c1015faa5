"""The sampler's inverse-CDF draw follows its probabilities to float64 precision: the draft's
proposals are exactly the q that rejection sampling is told (issue 24, defect 7)."""

from __future__ import annotations

import torch

from faser_sgl.executor.sampler import Sampler, SamplingOptions, sample_from_probs

VOCAB = 152_064  # Qwen2.5-7B's rows


def reference_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF in float64 throughout: the first token whose cumulative mass exceeds u * total."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    return torch.searchsorted(cdf, (u.to(torch.float64) * cdf[:, -1])[:, None], right=True).squeeze(1)


def tiny_then_large() -> torch.Tensor:
    """150,000 tokens of 5e-6 (three quarters of the mass) before one large token: a float32 CDF
    is rounded to steps of ~6e-8 there, a percent of each tiny token's width."""
    p = torch.zeros(1, VOCAB)
    p[0, :150_000] = 5e-6
    p[0, 150_000] = 1 - float(p.sum())
    return p


def test_draw_matches_the_float64_inverse_cdf_where_float32_picks_a_neighbour():
    probs = tiny_then_large()
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.75
    # The construction is adversarial: a float32 CDF sends some of these uniforms to a neighbour.
    # (One row's CDFs, searched for every uniform: [20000, V] float64 would take 24 GB.)
    cdf32, cdf64 = torch.cumsum(probs[0], dim=-1), torch.cumsum(probs[0].double(), dim=-1)
    float32_pick = torch.searchsorted(cdf32, u.float() * cdf32[-1], right=True)
    expected = torch.searchsorted(cdf64, u * cdf64[-1], right=True)
    wrong = torch.nonzero(float32_pick != expected).flatten()
    assert len(wrong) >= 20, "the float32 CDF should misplace some draws"
    picked = torch.cat([wrong, torch.arange(50)])  # the misplaced ones and some ordinary ones
    for chunk in picked.split(32):
        drawn = sample_from_probs(probs.expand(len(chunk), -1), u[chunk])
        assert torch.equal(drawn, expected[chunk]), (u[chunk], drawn, expected[chunk])


def test_a_uniform_just_below_one_never_lands_on_a_zero_probability_token():
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    assert sample_from_probs(probs, torch.tensor([1 - 2**-53], dtype=torch.float64)).tolist() == [1]


def test_uniforms_are_float64_draws_of_the_request_stream():
    opts = [SamplingOptions(temperature=1.0, seed=11), SamplingOptions(temperature=0.0),
            SamplingOptions(temperature=0.7, seed=12)]
    u = Sampler.uniforms(opts)
    assert u.dtype == torch.float64
    expected = [torch.rand((), generator=torch.Generator().manual_seed(s), dtype=torch.float64).item()
                for s in (11, 12)]
    assert [u[0].item(), u[2].item()] == expected and u[1].item() == 0.0  # greedy rows draw nothing


def test_seeded_sampling_draws_exactly_the_reference_token():
    """End to end through Sampler.sample: a seeded request's token is the float64 inverse CDF of
    its own probabilities at the float64 uniform of its own stream."""
    logits = torch.log(tiny_then_large())
    sampler = Sampler()
    for seed in range(200):
        opts = SamplingOptions(temperature=1.0, seed=seed)
        probs = sampler.probs(logits, [opts])
        u = torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.equal(sampler.sample(logits, [opts]), reference_draw(probs, u)), seed
