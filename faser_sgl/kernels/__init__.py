"""Speculative-decoding kernels.

``greedy_accept`` / ``rejection_sample`` dispatch to Triton for CUDA tensors when Triton is
available and to the torch reference otherwise; both give bit-identical results (see
accept_reject.py for why), so callers never need to care which one ran.
"""

from __future__ import annotations

import torch

from faser_sgl.kernels import accept_reject as _reference
from faser_sgl.kernels import accept_reject_triton as _triton
from faser_sgl.kernels.accept_reject import make_uniforms

__all__ = ["greedy_accept", "rejection_sample", "make_uniforms"]


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and _triton.available()


def greedy_accept(draft_tokens: torch.Tensor, draft_indptr: torch.Tensor, target_argmax: torch.Tensor,
                  max_draft_len: int | None = None):
    """-> (num_accepted [B], emitted [B, max_k+1] padded with -1, num_emitted [B]); all int64."""
    impl = _triton if _use_triton(target_argmax) else _reference
    return impl.greedy_accept(draft_tokens, draft_indptr, target_argmax, max_draft_len)


def rejection_sample(draft_tokens: torch.Tensor, draft_indptr: torch.Tensor, draft_probs: torch.Tensor,
                     target_probs: torch.Tensor, accept_uniforms: torch.Tensor, sample_uniforms: torch.Tensor,
                     max_draft_len: int | None = None):
    """-> (num_accepted [B], emitted [B, max_k+1] padded with -1, num_emitted [B]); all int64.
    draft_probs may be narrower than target_probs (a draft with fewer vocabulary rows): its
    missing ids have probability 0, so both implementations get it zero-extended."""
    draft_probs = _on_target_width(draft_probs, target_probs.shape[-1])
    impl = _triton if _use_triton(target_probs) else _reference
    return impl.rejection_sample(draft_tokens, draft_indptr, draft_probs, target_probs,
                                 accept_uniforms, sample_uniforms, max_draft_len)


def _on_target_width(draft_probs: torch.Tensor, width: int) -> torch.Tensor:
    """q over the target's ids.  A wider q is refused rather than cut: its extra ids were
    proposable, so cutting them would make q differ from what the draft drew from (the draft
    worker maps the draft's logits onto the target's ids before sampling instead)."""
    have = draft_probs.shape[-1]
    if have > width:
        raise ValueError(f"draft distribution over {have} ids is wider than the target's {width}: "
                         "map the draft's logits onto the target's ids before sampling")
    if have < width:
        draft_probs = torch.nn.functional.pad(draft_probs, (0, width - have))
    return draft_probs
