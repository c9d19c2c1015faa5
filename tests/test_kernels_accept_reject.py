"""Accept/reject semantics of faser_sgl.kernels (torch reference): exact hand-built cases,
randomized cross-checks against per-request Python loops, and a statistical losslessness test."""

from __future__ import annotations

import math

import pytest
import torch

from faser_sgl import kernels
from faser_sgl.kernels import accept_reject as ref


def indptr_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)


# ----------------------------------------------------------------------------------- greedy

def test_greedy_hand_built_ragged_batch():
    # req0: k=3 all accepted -> bonus; req1: k=2 first rejected; req2: k=0; req3: k=3, 2nd rejected.
    lengths = [3, 2, 0, 3]
    drafts = torch.tensor([5, 6, 7, 1, 2, 9, 8, 3])
    argmax = torch.tensor([5, 6, 7, 42,   # req0 rows 0..3 (row 3 = bonus)
                           4, 2, 0,       # req1: draft 1 != 4
                           11,            # req2: bonus only
                           9, 0, 3, 5])   # req3: 8 != 0 at j=1
    num_acc, emitted, num_emit = kernels.greedy_accept(drafts, indptr_of(lengths), argmax)
    assert num_acc.tolist() == [3, 0, 0, 1]
    assert num_emit.tolist() == [4, 1, 1, 2]
    assert emitted.tolist() == [[5, 6, 7, 42], [4, -1, -1, -1], [11, -1, -1, -1], [9, 0, -1, -1]]


def test_greedy_single_request_and_all_empty():
    num_acc, emitted, _ = kernels.greedy_accept(torch.tensor([3]), indptr_of([1]), torch.tensor([3, 8]))
    assert num_acc.tolist() == [1] and emitted.tolist() == [[3, 8]]
    num_acc, emitted, num_emit = kernels.greedy_accept(torch.zeros(0, dtype=torch.int64), indptr_of([0, 0]),
                                                       torch.tensor([4, 2]))
    assert num_acc.tolist() == [0, 0] and emitted.tolist() == [[4], [2]] and num_emit.tolist() == [1, 1]


def greedy_loop(drafts, lengths, argmax):
    out, d, t = [], 0, 0
    for k in lengths:
        emitted = []
        for j in range(k):
            if drafts[d + j] != argmax[t + j]:
                break
            emitted.append(drafts[d + j])
        emitted.append(argmax[t + len(emitted)])
        out.append(emitted)
        d, t = d + k, t + k + 1
    return out


def test_greedy_matches_python_loop_randomized():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        batch = int(torch.randint(1, 12, (1,), generator=gen))
        lengths = torch.randint(0, 6, (batch,), generator=gen).tolist()
        argmax = torch.randint(0, 4, (sum(lengths) + batch,), generator=gen)  # tiny vocab: many matches
        # Drafts mostly copy the target so long accepted prefixes occur.
        target_rows = torch.cat([torch.arange(k) + s for k, s in
                                 zip(lengths, (indptr_of(lengths)[:-1] + torch.arange(batch)).tolist())]).long()
        drafts = torch.where(torch.rand(sum(lengths), generator=gen) < 0.8, argmax[target_rows],
                             torch.randint(0, 4, (sum(lengths),), generator=gen))
        num_acc, emitted, num_emit = kernels.greedy_accept(drafts, indptr_of(lengths), argmax)
        expected = greedy_loop(drafts.tolist(), lengths, argmax.tolist())
        assert emitted.shape == (batch, max(lengths) + 1)
        for i, exp in enumerate(expected):
            assert num_emit[i] == len(exp) == num_acc[i] + 1
            assert emitted[i].tolist() == exp + [-1] * (emitted.shape[1] - len(exp))


# -------------------------------------------------------------------- rejection: exact cases

def one_hot(v: int, token: int) -> list[float]:
    row = [0.0] * v
    row[token] = 1.0
    return row


def test_rejection_hand_built_deterministic_outcomes():
    v = 5
    lengths = [2, 1, 0, 1]
    drafts = torch.tensor([1, 2, 3, 0])
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0],   # req0 draft0 = 1
                      [0.0, 0.0, 1.0, 0.0, 0.0],   # req0 draft1 = 2
                      [0.0, 0.0, 0.0, 1.0, 0.0],   # req1 draft0 = 3, but p(3) = 0 -> rejected
                      [0.5, 0.5, 0.0, 0.0, 0.0]])  # req3 draft0 = 0, p == q, p(0) = 0.5
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0],   # req0: p == q at the draft -> always accepted
                      [0.0, 0.0, 1.0, 0.0, 0.0],
                      one_hot(v, 4),                # req0 bonus -> 4
                      [0.2, 0.0, 0.0, 0.0, 0.8],   # req1 judge: residual max(p - q, 0) = p here
                      one_hot(v, 1),                # req1 bonus row (unused)
                      one_hot(v, 3),                # req2: k=0 -> sample from p -> 3
                      [0.5, 0.5, 0.0, 0.0, 0.0],   # req3 judge: u*0.5 < 0.5 -> accepted
                      one_hot(v, 2)])               # req3 bonus -> 2
    accept_u = torch.tensor([0.999, 0.999, 0.0, 0.999], dtype=torch.float64)
    sample_u = torch.tensor([0.5, 0.3, 0.9, 0.5], dtype=torch.float64)  # req1: 0.3 of [0.2, .., 0.8] -> 4
    num_acc, emitted, num_emit = kernels.rejection_sample(drafts, indptr_of(lengths), q, p, accept_u, sample_u)
    assert num_acc.tolist() == [2, 0, 0, 1]
    assert num_emit.tolist() == [3, 1, 1, 2]
    assert emitted.tolist() == [[1, 2, 4], [4, -1, -1], [3, -1, -1], [0, 2, -1]]


def test_rejection_falls_back_to_p_when_residual_is_empty():
    # p == q and the draft token has p = q = 0 -> rejected; max(p - q, 0) == 0 everywhere -> sample p.
    p = torch.tensor([[0.0, 0.25, 0.75], [0.0, 0.25, 0.75]])
    q = p[:1].clone()
    for u, token in [(0.0, 1), (0.2, 1), (0.3, 2), (1 - 2**-53, 2)]:
        num_acc, emitted, _ = kernels.rejection_sample(torch.tensor([0]), indptr_of([1]), q, p,
                                                       torch.tensor([0.5], dtype=torch.float64),
                                                       torch.tensor([u], dtype=torch.float64))
        assert num_acc.item() == 0 and emitted.tolist() == [[token, -1]]


def test_inverse_cdf_edges_never_pick_zero_weight_tokens():
    w = ref.to_fixed_point(torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.5, 0.0]] * 4))
    u = torch.tensor([0.0, 0.5 - 2**-40, 0.5, 1 - 2**-53], dtype=torch.float64)
    assert ref.inverse_cdf(w, u).tolist() == [2, 2, 4, 4]
    assert ref.inverse_cdf(torch.zeros(1, 3, dtype=torch.int64), u[:1]).tolist() == [2]  # documented


def test_rejection_large_vocab_float32():
    v = 151_936
    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(3, v, generator=gen) * 3, dim=-1)
    q = torch.softmax(torch.randn(2, v, generator=gen) * 3, dim=-1)
    q[0].zero_()
    q[0, 7] = 1.0  # draft certain of token 7, target gives it ~1/V -> rejected with u = 0.999
    p[0, 7] = 1e-6
    accept_u = torch.tensor([0.999, 0.0], dtype=torch.float64)
    num_acc, emitted, _ = kernels.rejection_sample(torch.tensor([7, 5]), indptr_of([2]), q, p, accept_u,
                                                   torch.tensor([0.25], dtype=torch.float64))
    assert num_acc.item() == 0
    # Residual max(p - one_hot(7), 0) == p with token 7 removed; compare with a float64 inverse CDF.
    residual = p[0].double().clone()
    residual[7] = 0.0
    cdf = residual.cumsum(0) / residual.sum()
    expected = int((cdf <= 0.25).sum())
    assert emitted[0, 0].item() == expected and emitted[0, 1:].tolist() == [-1, -1]


# ------------------------------------------------------------- rejection: randomized vs loop

def rejection_loop(drafts, lengths, q, p, accept_u, sample_u):
    """Plain per-request transcription of the algorithm (same fixed-point sampling rule)."""
    out, d = [], 0
    for i, k in enumerate(lengths):
        t, emitted = d + i, []
        for j in range(k):
            x = int(drafts[d + j])
            if not accept_u[d + j].item() * float(q[d + j, x]) < float(p[t + j, x]):
                break
            emitted.append(x)
        n = len(emitted)
        weights = torch.clamp_min(p[t + n] - q[d + n], 0.0) if n < k else p[t + n]
        if n < k and ref.to_fixed_point(weights).sum() == 0:
            weights = p[t + n]
        emitted.append(int(ref.inverse_cdf(ref.to_fixed_point(weights)[None], sample_u[i:i + 1])))
        out.append(emitted)
        d += k
    return out


def test_rejection_matches_python_loop_randomized():
    gen = torch.Generator().manual_seed(2)
    for trial in range(15):
        batch, v = int(torch.randint(1, 10, (1,), generator=gen)), [3, 17, 50][trial % 3]
        lengths = torch.randint(0, 5, (batch,), generator=gen).tolist()
        indptr = indptr_of(lengths)
        p = torch.softmax(torch.randn(sum(lengths) + batch, v, generator=gen) * 2, dim=-1)
        p = torch.where(torch.rand(p.shape, generator=gen) < 0.3, 0.0, p)  # sparse rows, zero-prob tokens
        p[:, 0] += 1e-3
        p = p / p.sum(-1, keepdim=True)
        q = torch.softmax(torch.randn(sum(lengths), v, generator=gen) * 2, dim=-1)
        same = torch.rand(sum(lengths), generator=gen) < 0.3  # some drafts equal the target: p == q
        req = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths))
        q[same] = p[torch.arange(sum(lengths)) + req][same]
        drafts = torch.multinomial(q, 1, generator=gen).squeeze(1) if sum(lengths) else torch.zeros(0).long()
        accept_u, sample_u = ref.make_uniforms(indptr, [torch.Generator().manual_seed(100 * trial + i)
                                                        for i in range(batch)])
        num_acc, emitted, num_emit = kernels.rejection_sample(drafts, indptr, q, p, accept_u, sample_u)
        expected = rejection_loop(drafts, lengths, q, p, accept_u, sample_u)
        for i, exp in enumerate(expected):
            assert num_emit[i] == len(exp) == num_acc[i] + 1
            assert emitted[i].tolist() == exp + [-1] * (emitted.shape[1] - len(exp))


def test_make_uniforms_is_per_request_and_batch_independent():
    alone_a, alone_s = ref.make_uniforms(indptr_of([3]), [torch.Generator().manual_seed(7)])
    batch_a, batch_s = ref.make_uniforms(indptr_of([2, 3, 0]), [torch.Generator().manual_seed(1),
                                                                 torch.Generator().manual_seed(7), None])
    assert batch_a.dtype == torch.float64 and batch_a.shape == (5,) and batch_s.shape == (3,)
    assert torch.equal(batch_a[2:5], alone_a) and torch.equal(batch_s[1:2], alone_s)
    assert ((batch_a >= 0) & (batch_a < 1)).all()
    with pytest.raises(ValueError):
        ref.make_uniforms(indptr_of([1, 1]), [None])


# ------------------------------------------------------------------- losslessness (chi-square)

P = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.10, 0.00],   # target per position j (row j judges draft j)
                  [0.05, 0.10, 0.00, 0.40, 0.25, 0.20],
                  [0.20, 0.20, 0.20, 0.00, 0.20, 0.20],
                  [0.50, 0.00, 0.10, 0.10, 0.10, 0.20]])
Q = torch.tensor([[0.10, 0.40, 0.00, 0.20, 0.05, 0.25],   # draft: q > 0 where p = 0 and vice versa
                  [0.30, 0.00, 0.30, 0.10, 0.10, 0.20],
                  [0.05, 0.05, 0.50, 0.30, 0.05, 0.05],
                  [0.25, 0.25, 0.25, 0.25, 0.00, 0.00]])
NUM_REQUESTS = 40_000


def chi_square_pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit; categories with probability 0 must be empty (checked by the caller)."""
    support = probs > 0
    obs = observed[support].double()
    exp = obs.sum() * probs[support].double() / probs[support].double().sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = int(support.sum()) - 1
    try:
        from scipy.stats import chi2
        return float(chi2.sf(stat, dof))
    except ImportError:  # survival function = regularized upper incomplete gamma Q(dof/2, stat/2)
        return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))


def speculative_batch(seed: int):
    """NUM_REQUESTS requests with k = 0..3 drafts sampled from Q; every request sees target P."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.arange(NUM_REQUESTS) % 4
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    req = torch.repeat_interleave(torch.arange(NUM_REQUESTS), lengths)
    pos = torch.arange(int(lengths.sum())) - indptr[req]
    draft_probs = Q[pos]
    drafts = torch.multinomial(draft_probs, 1, replacement=True, generator=gen).squeeze(1)
    target_rows_pos = torch.cat([torch.arange(int(k) + 1) for k in lengths.tolist()])
    target_probs = P[target_rows_pos]
    accept_u = torch.rand(drafts.numel(), generator=gen, dtype=torch.float64)
    sample_u = torch.rand(NUM_REQUESTS, generator=gen, dtype=torch.float64)
    return drafts, indptr, draft_probs, target_probs, accept_u, sample_u


def wrong_resample_from_p(drafts, indptr, draft_probs, target_probs, accept_u, sample_u):
    """Deliberately broken variant: on rejection sample from p instead of norm(max(0, p - q))."""
    num_acc, emitted, num_emit = ref.rejection_sample(drafts, indptr, draft_probs, target_probs,
                                                      accept_u, sample_u)
    rows = indptr[:-1] + torch.arange(indptr.numel() - 1) + num_acc
    from_p = ref.inverse_cdf(ref.to_fixed_point(target_probs[rows]), sample_u)
    emitted = emitted.clone()
    emitted[torch.arange(emitted.shape[0]), num_acc] = from_p
    return num_acc, emitted, num_emit


def emitted_histograms(num_acc, emitted):
    """Token histogram at emitted position n over requests that reached it by accepting n drafts."""
    hists = []
    for n in range(3):
        reached = num_acc >= n
        hists.append(torch.bincount(emitted[reached, n], minlength=P.shape[1]))
    return hists


@pytest.mark.parametrize("seed", [0, 1])
def test_rejection_sampling_is_lossless(seed):
    batch = speculative_batch(seed)
    num_acc, emitted, _ = kernels.rejection_sample(*batch)
    lengths = batch[1][1:] - batch[1][:-1]
    for n, hist in enumerate(emitted_histograms(num_acc, emitted)):
        assert hist[P[n] == 0].sum() == 0, f"position {n} emitted a token the target gives probability 0"
        assert hist.sum() > 3000  # ~5000 reach position 2
        assert chi_square_pvalue(hist, P[n]) > 1e-3, f"position {n}: {hist.tolist()} vs {P[n].tolist()}"
    # The first draft is accepted with probability sum_x min(p, q) = 0.55 (3-sigma band).
    first = num_acc[lengths >= 1] >= 1
    rate, sigma = first.double().mean().item(), math.sqrt(0.55 * 0.45 / first.numel())
    assert abs(rate - 0.55) < 4 * sigma


def test_chi_square_detects_wrong_residual():
    """Power check: the same test must reject a sampler that resamples from p after a rejection."""
    batch = speculative_batch(0)
    num_acc, emitted, _ = wrong_resample_from_p(*batch)
    hist = emitted_histograms(num_acc, emitted)[0]
    assert chi_square_pvalue(hist, P[0]) < 1e-6


def test_chi_square_pvalue_matches_known_values():
    # chi2.sf(3.84146, 1) = 0.05, chi2.sf(11.0705, 5) = 0.05
    for stat, dof in [(3.841459, 1), (11.070498, 5)]:
        q = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                    torch.tensor(stat / 2, dtype=torch.float64))
        assert float(q) == pytest.approx(0.05, abs=1e-6)
