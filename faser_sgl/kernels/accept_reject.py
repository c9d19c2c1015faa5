"""Speculative-decoding accept/reject for a ragged batch: torch reference (any device).

Layout (page-size-1 ragged):
  * request i's drafts are ``draft_tokens[draft_indptr[i]:draft_indptr[i+1]]`` (k_i >= 0 of them);
  * its target rows are ``draft_indptr[i] + i + j`` for j in 0..k_i: row j judges draft j and
    row k_i is the bonus position.

Outputs of both entry points: ``num_accepted`` [B] int64, ``emitted`` [B, max_k+1] int64 padded
with -1, ``num_emitted`` [B] int64 (always num_accepted + 1).

Determinism across implementations (this file and the Triton kernels): every decision is
computed with the same IEEE operations, and sampling never depends on summation order.
  * Accept test: ``u * q(x) < p(x)`` in float64 (probabilities are read as float32 first).
  * Sampling weights ``w`` (float32: ``max(p - q, 0)`` or ``p``) are turned into exact integers
    ``floor(w * 2**40)`` (a power-of-two scale is exact in float32), so every sum / prefix sum is
    exact int64 arithmetic and any summation order gives the same bits.  Inverse CDF:
    ``t = floor(u * total)`` in float64, token = first index whose integer prefix sum exceeds t.
    The quantum 2**-40 (~1e-12) is far below float32's own rounding of p (~6e-8 relative), so it
    does not change the distribution beyond what float32 probabilities already carry; a token is
    sampled only if its integer weight is > 0, so a token with p == 0 is never emitted.
"""

from __future__ import annotations

import torch

# Fixed-point scale for sampling weights (see module docstring).  Valid distributions give
# totals <= 2**41 (exact in float64); even unnormalised weights <= 1 stay < V * 2**40 < 2**58 for
# V = 151,936, far from int64 overflow.
FIXED_POINT_SCALE = float(2**40)

# Cap on elements of the [rows, V] int64 scratch used by the reference sampler (bounds memory).
_MAX_SCRATCH_ELEMENTS = 1 << 24


def _draft_lengths(draft_indptr: torch.Tensor) -> torch.Tensor:
    return draft_indptr[1:] - draft_indptr[:-1]


def _resolve_max_k(draft_indptr: torch.Tensor, max_draft_len: int | None) -> int:
    if max_draft_len is not None:
        return int(max_draft_len)
    if draft_indptr.numel() <= 1:
        return 0
    return int(_draft_lengths(draft_indptr).max().item())  # one host sync


def _ragged_positions(draft_indptr: torch.Tensor, total_drafts: int):
    """For every draft: (request id, position j inside its request). No host sync besides sizes."""
    lengths = _draft_lengths(draft_indptr)
    batch = lengths.numel()
    req = torch.repeat_interleave(torch.arange(batch, device=draft_indptr.device), lengths,
                                  output_size=total_drafts)
    pos = torch.arange(total_drafts, device=draft_indptr.device) - draft_indptr[req]
    return req, pos


def _first_failure(ok: torch.Tensor, req: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor):
    """Per request: index of the first draft with ok == False, or k_i when all passed."""
    candidate = torch.where(ok, lengths[req], pos)
    return lengths.clone().scatter_reduce_(0, req, candidate, reduce="amin", include_self=True)


def _assemble(draft_tokens, req, pos, num_accepted, final_tokens, batch, max_k):
    """Accepted drafts followed by the final (correction or bonus) token, padded with -1."""
    emitted = torch.full((batch, max_k + 1), -1, dtype=torch.int64, device=draft_tokens.device)
    kept = torch.where(pos < num_accepted[req], draft_tokens.to(torch.int64), -1)
    emitted[req, pos] = kept  # (req, pos) pairs are unique
    emitted[torch.arange(batch, device=emitted.device), num_accepted] = final_tokens
    return num_accepted, emitted, num_accepted + 1


def greedy_accept(draft_tokens: torch.Tensor, draft_indptr: torch.Tensor, target_argmax: torch.Tensor,
                  max_draft_len: int | None = None):
    """Accept the longest prefix with draft == target argmax, then emit the target's token."""
    batch = draft_indptr.numel() - 1
    max_k = _resolve_max_k(draft_indptr, max_draft_len)
    lengths = _draft_lengths(draft_indptr)
    target_start = draft_indptr[:-1] + torch.arange(batch, device=draft_indptr.device)
    req, pos = _ragged_positions(draft_indptr, draft_tokens.numel())

    judge_rows = torch.arange(draft_tokens.numel(), device=req.device) + req  # target row judging each draft
    match = draft_tokens.to(torch.int64) == target_argmax[judge_rows].to(torch.int64)
    num_accepted = _first_failure(match, req, pos, lengths)
    final = target_argmax[target_start + num_accepted].to(torch.int64)
    return _assemble(draft_tokens, req, pos, num_accepted, final, batch, max_k)


def to_fixed_point(weights: torch.Tensor) -> torch.Tensor:
    """float32 weights in [0, 1] -> exact int64 fixed point (truncation == floor for w >= 0)."""
    return (weights.to(torch.float32) * FIXED_POINT_SCALE).to(torch.int64)


def inverse_cdf(int_weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row-wise: first index whose exact prefix sum exceeds floor(u * total).

    int_weights [R, V] int64 >= 0, uniforms [R] float64 in [0, 1).  For u < 1 and total < 2**53,
    floor(u * total) <= total - 1 already (the float64 product never rounds up to total); the
    clamp to [0, total-1] only guards invalid u outside [0, 1).  An all-zero row returns V-1.
    """
    cdf = torch.cumsum(int_weights, dim=-1)
    total = cdf[:, -1]
    threshold = (uniforms.to(torch.float64) * total.to(torch.float64)).to(torch.int64)
    threshold = torch.minimum(threshold, total - 1).clamp_(min=0)
    index = (cdf <= threshold[:, None]).sum(dim=-1)
    return index.clamp_(max=int_weights.shape[-1] - 1)


def accept_mask(u: torch.Tensor, q_x: torch.Tensor, p_x: torch.Tensor) -> torch.Tensor:
    """The accept test, elementwise on float64: ``u * q(x) < p(x)``, i.e. accept with probability
    min(1, p(x) / q(x)).  A plain function that rejection_sample looks up at call time, so tests
    can inject a wrong rule (the Triton kernel mirrors this expression)."""
    return u * q_x < p_x


def residual_weights(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised float32 weights of the token sampled at a rejection: ``max(p - q, 0)``.  Also
    used for the bonus token with q == 0 (max(p - 0, 0) == p bit-exactly).  Looked up at call
    time like accept_mask (the Triton kernel mirrors it in _fixed_point_weights)."""
    return torch.clamp_min(p - q, 0.0)


def _sample_rows(target_probs, draft_probs, p_rows, q_rows, use_residual, uniforms):
    """Sample one token per row from norm(max(p - q, 0)) (or p when use_residual is False or the
    residual is all zero).  Processed in chunks so the int64 scratch stays bounded for large V."""
    vocab = target_probs.shape[-1]
    out = torch.empty(p_rows.numel(), dtype=torch.int64, device=target_probs.device)
    chunk = max(1, _MAX_SCRATCH_ELEMENTS // max(vocab, 1))
    for s in range(0, p_rows.numel(), chunk):
        sl = slice(s, s + chunk)
        p = target_probs[p_rows[sl]].to(torch.float32)
        q = draft_probs[q_rows[sl]].to(torch.float32) if draft_probs.shape[0] else torch.zeros_like(p)
        # q is zeroed (not skipped) where the residual is not used: max(p - 0, 0) == p bit-exactly.
        q = torch.where(use_residual[sl, None], q, 0.0)
        weights = to_fixed_point(residual_weights(p, q))
        empty = weights.sum(dim=-1) == 0  # p == q numerically: fall back to p
        weights = torch.where(empty[:, None], to_fixed_point(p), weights)
        out[sl] = inverse_cdf(weights, uniforms[sl])
    return out


def rejection_sample(draft_tokens: torch.Tensor, draft_indptr: torch.Tensor, draft_probs: torch.Tensor,
                     target_probs: torch.Tensor, accept_uniforms: torch.Tensor, sample_uniforms: torch.Tensor,
                     max_draft_len: int | None = None):
    """Lossless speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    Draft j is accepted iff ``u_j * q_j(x_j) < p_j(x_j)`` (probability min(1, p/q)).  At the first
    rejection the emitted token is sampled from norm(max(0, p_j - q_j)) (p_j if that is all
    zero); if all k_i drafts are accepted the bonus token is sampled from p_{k_i}.
    draft_probs [sum k_i, V] and target_probs [sum (k_i+1), V] are the final distributions.
    """
    batch = draft_indptr.numel() - 1
    max_k = _resolve_max_k(draft_indptr, max_draft_len)
    lengths = _draft_lengths(draft_indptr)
    device = draft_indptr.device
    total_drafts = draft_tokens.numel()
    req, pos = _ragged_positions(draft_indptr, total_drafts)

    tokens = draft_tokens.to(torch.int64)
    draft_rows = torch.arange(total_drafts, device=device)
    p_x = target_probs[draft_rows + req, tokens].to(torch.float32).to(torch.float64)
    q_x = draft_probs[draft_rows, tokens].to(torch.float32).to(torch.float64)
    accepted = accept_mask(accept_uniforms.to(torch.float64), q_x, p_x)
    num_accepted = _first_failure(accepted, req, pos, lengths)

    rejected = num_accepted < lengths
    p_rows = draft_indptr[:-1] + torch.arange(batch, device=device) + num_accepted
    # For fully accepted requests this row may not exist (or belong to the next request); it is
    # clamped to a valid row and then ignored because use_residual is False there.
    q_rows = (draft_indptr[:-1] + num_accepted).clamp(max=max(total_drafts - 1, 0))
    final = _sample_rows(target_probs, draft_probs, p_rows, q_rows, rejected, sample_uniforms)
    return _assemble(draft_tokens, req, pos, num_accepted, final, batch, max_k)


def make_uniforms(draft_indptr: torch.Tensor, generators: list[torch.Generator | None],
                  device: torch.device | str | None = None):
    """Per-request uniforms for rejection_sample: (accept_uniforms [sum k_i], sample_uniforms [B]).

    Request i draws k_i + 1 float64 uniforms from its own generator (None -> torch's default
    generator for that device): the first k_i judge its drafts, the last samples the final token.
    A request's stream therefore does not depend on which other requests share the batch.
    float64 so inverse-CDF sampling resolves probabilities far below float32's 2**-24 step.
    """
    device = torch.device(device) if device is not None else draft_indptr.device
    lengths = _draft_lengths(draft_indptr).tolist()  # host sync: generators live on the host side
    if len(generators) != len(lengths):
        raise ValueError(f"need one generator per request: {len(generators)} != {len(lengths)}")
    accept, sample = [], []
    for k, gen in zip(lengths, generators):
        gen_device = gen.device if gen is not None else device
        draws = torch.rand(k + 1, generator=gen, dtype=torch.float64, device=gen_device).to(device)
        accept.append(draws[:k])
        sample.append(draws[k:])
    if not lengths:
        empty = torch.empty(0, dtype=torch.float64, device=device)
        return empty, empty.clone()
    return torch.cat(accept), torch.cat(sample)
