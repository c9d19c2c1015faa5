"""Attention backends behind one interface (base.AttentionBackend):

* "torch": plain-torch reference, any device; the CPU backend.
* "flashinfer": FlashInfer's paged prefill kernel; CUDA with float16/bfloat16 only.
"""

from __future__ import annotations

import torch

from faser_sgl.executor.attention.base import AttentionBackend

BACKENDS = ("torch", "flashinfer")


def create_backend(name: str, num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AttentionBackend:
    if name == "torch":
        from faser_sgl.executor.attention.torch_backend import TorchAttention

        return TorchAttention(num_heads, num_kv_heads, head_dim)
    if name == "flashinfer":
        from faser_sgl.executor.attention.flashinfer_backend import FlashInferAttention

        return FlashInferAttention(num_heads, num_kv_heads, head_dim, dtype, device)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["AttentionBackend", "BACKENDS", "create_backend"]
