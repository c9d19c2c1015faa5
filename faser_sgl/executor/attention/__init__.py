"""Attention backends behind one interface: "torch" (reference, any device) and
"flashinfer" (CUDA)."""

from __future__ import annotations

from faser_sgl.executor.attention.base import AttentionBackend


def create_backend(name: str, num_heads: int, num_kv_heads: int, head_dim: int,
                   device: str = "cpu") -> AttentionBackend:
    if name == "torch":
        from faser_sgl.executor.attention.torch_backend import TorchAttention

        return TorchAttention(num_heads, num_kv_heads, head_dim)
    if name == "flashinfer":
        from faser_sgl.executor.attention.flashinfer_backend import FlashInferAttention

        return FlashInferAttention(num_heads, num_kv_heads, head_dim, device)
    raise ValueError(f"unknown attention backend {name!r}; choose torch or flashinfer")
