"""Triton kernels behind accept_reject_triton.py (imported lazily: importing this imports triton).

One program per request.  Drafts are judged in a while loop that stops at the first rejection;
the final token is sampled with two blocked passes over V (exact int64 total, then the
inverse-CDF search).  The arithmetic mirrors accept_reject.py op for op so results are
bit-identical (see that module's docstring): float64 accept test, float32 residual, int64 fixed
point weights whose sums do not depend on the order Triton reduces/scans in.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def greedy_accept_kernel(draft_tokens_ptr, draft_indptr_ptr, target_argmax_ptr,
                         num_accepted_ptr, emitted_ptr, emitted_stride, emitted_cols):
    req = tl.program_id(0)
    draft_start = tl.load(draft_indptr_ptr + req)
    num_drafts = tl.load(draft_indptr_ptr + req + 1) - draft_start
    target_start = draft_start + req
    # Stores are masked with j < emitted_cols so a max_draft_len below max k_i (a caller bug)
    # cannot write into the next request's row; the torch reference raises instead.
    out_row = emitted_ptr + req.to(tl.int64) * emitted_stride

    j = num_drafts * 0
    go = j < num_drafts
    while go:
        draft = tl.load(draft_tokens_ptr + draft_start + j).to(tl.int64)
        target = tl.load(target_argmax_ptr + target_start + j).to(tl.int64)
        match = draft == target
        # Written even on a mismatch: the final store below overwrites slot j in that case.
        tl.store(out_row + j, draft, mask=j < emitted_cols)
        j += match.to(tl.int64)
        go = match & (j < num_drafts)

    tl.store(num_accepted_ptr + req, j)
    tl.store(out_row + j, tl.load(target_argmax_ptr + target_start + j).to(tl.int64), mask=j < emitted_cols)


@triton.jit
def _fixed_point_weights(p_row_ptr, q_row_ptr, offs, mask, use_residual, SCALE: tl.constexpr):
    """int64 floor((max(p - q, 0)) * SCALE) for one block; q reads as 0 unless use_residual, and
    max(p - 0, 0) == p exactly, so the same code serves residual and plain-p sampling."""
    p = tl.load(p_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(q_row_ptr + offs, mask=mask & use_residual, other=0.0).to(tl.float32)
    w = tl.maximum(p - q, 0.0)
    return (w * SCALE).to(tl.int64)


@triton.jit
def _total_weight(p_row_ptr, q_row_ptr, use_residual, vocab, SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    total = tl.zeros((), dtype=tl.int64)
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        w = _fixed_point_weights(p_row_ptr, q_row_ptr, offs, offs < vocab, use_residual, SCALE)
        total += tl.sum(w, axis=0)
    return total


@triton.jit
def rejection_sample_kernel(draft_tokens_ptr, draft_indptr_ptr, draft_probs_ptr, target_probs_ptr,
                            accept_uniforms_ptr, sample_uniforms_ptr, num_accepted_ptr, emitted_ptr,
                            emitted_stride, emitted_cols, draft_probs_stride, target_probs_stride, vocab,
                            SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    req = tl.program_id(0)
    draft_start = tl.load(draft_indptr_ptr + req)
    num_drafts = tl.load(draft_indptr_ptr + req + 1) - draft_start
    target_start = draft_start + req
    out_row = emitted_ptr + req.to(tl.int64) * emitted_stride

    # --- accept/reject the drafts in order, stopping at the first rejection -------------------
    j = num_drafts * 0
    go = j < num_drafts
    while go:
        token = tl.load(draft_tokens_ptr + draft_start + j).to(tl.int64)
        p = tl.load(target_probs_ptr + (target_start + j) * target_probs_stride + token)
        q = tl.load(draft_probs_ptr + (draft_start + j) * draft_probs_stride + token)
        u = tl.load(accept_uniforms_ptr + draft_start + j)
        accepted = u * q.to(tl.float32).to(tl.float64) < p.to(tl.float32).to(tl.float64)
        tl.store(out_row + j, token, mask=j < emitted_cols)  # overwritten by the final token if rejected
        j += accepted.to(tl.int64)
        go = accepted & (j < num_drafts)
    tl.store(num_accepted_ptr + req, j)

    # --- final token: residual at the rejection, or the bonus from p_{k} ----------------------
    use_residual = j < num_drafts
    p_row_ptr = target_probs_ptr + (target_start + j) * target_probs_stride
    # Only dereferenced when use_residual (masked loads), so an out-of-range row is harmless.
    q_row_ptr = draft_probs_ptr + (draft_start + j) * draft_probs_stride

    total = _total_weight(p_row_ptr, q_row_ptr, use_residual, vocab, SCALE, BLOCK_V)
    if use_residual & (total == 0):  # p == q numerically: sample from p instead
        use_residual = j < 0  # False, as a tensor so the branch keeps the variable's type
        total = _total_weight(p_row_ptr, q_row_ptr, use_residual, vocab, SCALE, BLOCK_V)

    u = tl.load(sample_uniforms_ptr + req)
    threshold = (u * total.to(tl.float64)).to(tl.int64)
    threshold = tl.maximum(tl.minimum(threshold, total - 1), 0)  # guards u outside [0, 1)

    # Skip whole blocks while the target index lies beyond them; the last block always stops
    # the loop (guards an all-zero row, which then yields V-1 like the reference).
    base = num_drafts * 0
    offs = base + tl.arange(0, BLOCK_V)
    mask = offs < vocab
    w = _fixed_point_weights(p_row_ptr, q_row_ptr, offs, mask, use_residual, SCALE)
    running = tl.zeros((), dtype=tl.int64)
    block_sum = tl.sum(w, axis=0)
    while (running + block_sum <= threshold) & (base + BLOCK_V < vocab):
        running += block_sum
        base += BLOCK_V
        offs = base + tl.arange(0, BLOCK_V)
        mask = offs < vocab
        w = _fixed_point_weights(p_row_ptr, q_row_ptr, offs, mask, use_residual, SCALE)
        block_sum = tl.sum(w, axis=0)

    cdf = running + tl.cumsum(w, axis=0)
    index = base + tl.sum(((cdf <= threshold) & mask).to(tl.int64), axis=0)
    tl.store(out_row + j, tl.minimum(index, vocab - 1), mask=j < emitted_cols)
