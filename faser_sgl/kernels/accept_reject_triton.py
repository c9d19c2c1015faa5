"""Triton accept/reject: same signatures and bit-identical results as accept_reject.py.

Triton is imported lazily so this module imports on machines without it.  On CPU tensors the
kernels only run under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported),
which is how the test-suite checks them without a GPU.
"""

from __future__ import annotations

import functools

import torch

from faser_sgl.kernels.accept_reject import FIXED_POINT_SCALE, _resolve_max_k

# Upper bound on the V block; small vocabularies use the next power of two instead.
_MAX_BLOCK_V = 4096


@functools.cache
def available() -> bool:
    """True when triton and our kernels import (says nothing about a GPU being present)."""
    try:
        from faser_sgl.kernels import _accept_reject_triton_kernels  # noqa: F401
    except Exception:  # ImportError, or a broken triton install
        return False
    return True


def _kernels():
    from faser_sgl.kernels import _accept_reject_triton_kernels

    return _accept_reject_triton_kernels


def _outputs(batch: int, max_k: int, device):
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    emitted = torch.full((batch, max_k + 1), -1, dtype=torch.int64, device=device)
    return num_accepted, emitted


def greedy_accept(draft_tokens: torch.Tensor, draft_indptr: torch.Tensor, target_argmax: torch.Tensor,
                  max_draft_len: int | None = None):
    """See accept_reject.greedy_accept."""
    batch = draft_indptr.numel() - 1
    max_k = _resolve_max_k(draft_indptr, max_draft_len)
    num_accepted, emitted = _outputs(batch, max_k, draft_indptr.device)
    if batch > 0:
        _kernels().greedy_accept_kernel[(batch,)](
            draft_tokens.contiguous(), draft_indptr.to(torch.int64).contiguous(), target_argmax.contiguous(),
            num_accepted, emitted, emitted.stride(0), emitted.shape[1])
    return num_accepted, emitted, num_accepted + 1


def rejection_sample(draft_tokens: torch.Tensor, draft_indptr: torch.Tensor, draft_probs: torch.Tensor,
                     target_probs: torch.Tensor, accept_uniforms: torch.Tensor, sample_uniforms: torch.Tensor,
                     max_draft_len: int | None = None):
    """See accept_reject.rejection_sample."""
    batch = draft_indptr.numel() - 1
    max_k = _resolve_max_k(draft_indptr, max_draft_len)
    num_accepted, emitted = _outputs(batch, max_k, draft_indptr.device)
    if batch == 0:
        return num_accepted, emitted, num_accepted + 1
    vocab = target_probs.shape[-1]
    if target_probs.stride(-1) != 1:
        target_probs = target_probs.contiguous()
    if draft_probs.shape[0] == 0:
        # No drafts at all: the kernel never reads q, but needs a valid pointer with a row stride.
        draft_probs = target_probs.new_zeros((1, vocab))
    elif draft_probs.stride(-1) != 1:
        draft_probs = draft_probs.contiguous()
    block_v = min(_MAX_BLOCK_V, _next_power_of_2(vocab))
    _kernels().rejection_sample_kernel[(batch,)](
        draft_tokens.contiguous(), draft_indptr.to(torch.int64).contiguous(), draft_probs, target_probs,
        accept_uniforms.to(torch.float64).contiguous(), sample_uniforms.to(torch.float64).contiguous(),
        num_accepted, emitted, emitted.stride(0), emitted.shape[1],
        draft_probs.stride(0), target_probs.stride(0), vocab,
        SCALE=FIXED_POINT_SCALE, BLOCK_V=block_v)
    return num_accepted, emitted, num_accepted + 1


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
