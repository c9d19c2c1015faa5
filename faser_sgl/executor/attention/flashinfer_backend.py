"""CUDA attention through FlashInfer's paged prefill kernel, page size 1.

One ``BatchPrefillWithPagedKVCacheWrapper.plan`` per forward pass serves every layer: ragged
query runs (qo_indptr) over each request's KV pages (kv_indptr / kv_indices, one token per page,
so every last page holds exactly 1 entry).  FlashInfer's causal mask is aligned to the bottom
right (query j of a run of q_i sees KV 0 .. kv_i - q_i + j), which is exactly the ForwardBatch
rule, so prefill, decode and draft verification all go through the same kernel.

Which of FlashInfer's kernel families runs is FlashInfer's choice ("auto": FA3 on Hopper for the
head dims it instantiates, FA2 elsewhere) unless FASER_SGL_FLASHINFER_BACKEND names one ("fa2",
"fa3").  scripts/gpu_check.sh pins fa2: a cold JIT build of the FA3 kernels may not fit a borrowed
machine's minutes.

flashinfer is imported lazily: the module must import on machines without it (CPU CI).
"""

from __future__ import annotations

import os

import torch

from faser_sgl.executor.attention.base import AttentionBackend
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended split-k scratch size
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_BACKENDS = ("auto", "fa2", "fa3")


def kernel_backend_choice() -> str:
    """FASER_SGL_FLASHINFER_BACKEND, default "auto" (FlashInfer decides per device)."""
    choice = os.environ.get("FASER_SGL_FLASHINFER_BACKEND", "auto").strip() or "auto"
    if choice not in KERNEL_BACKENDS:
        raise ValueError(f"FASER_SGL_FLASHINFER_BACKEND must be one of {KERNEL_BACKENDS}, got {choice!r}")
    return choice


def flashinfer_unavailable_reason() -> str | None:
    """None when the backend can run here, else why not (for errors and test skips)."""
    if not torch.cuda.is_available():
        return "the flashinfer attention backend needs a CUDA device (torch.cuda.is_available() is False)"
    try:
        import flashinfer  # noqa: F401
    except ImportError as err:
        return f"flashinfer is not importable ({err}); install flashinfer-python (requirements/cuda.txt)"
    return None


class FlashInferAttention(AttentionBackend):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: str | torch.device = "cuda"):
        super().__init__(num_heads, num_kv_heads, head_dim)
        reason = flashinfer_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"the flashinfer backend runs float16/bfloat16, not {dtype}; "
                             "use --faser-dtype bfloat16 or the torch backend")
        import flashinfer

        self.dtype = dtype
        self.device = torch.device(device)
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            workspace, kv_layout="NHD", backend=kernel_backend_choice())

    @property
    def kernel_backend(self) -> str | None:
        """The kernel family FlashInfer settled on ("fa2"/"fa3"), known after the first plan()."""
        return getattr(self.wrapper, "_backend", None)

    def begin_forward(self, batch: ForwardBatch) -> None:
        # plan() reads the indptrs on the host (it copies them there anyway), the page indices on
        # the device.
        qo_indptr = batch.qo_indptr.to("cpu", torch.int32)
        kv_indptr = batch.kv_indptr.to("cpu", torch.int32)
        kv_indices = batch.kv_indices.to(self.device, torch.int32)
        last_page_len = torch.ones(batch.batch_size, dtype=torch.int32, device="cpu")
        self.wrapper.plan(
            qo_indptr,
            kv_indptr,
            kv_indices,
            last_page_len,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            1,  # page size
            causal=True,
            sm_scale=self.scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        kv_cache.write(layer_id, batch.out_cache_loc, k, v)
        k_all, v_all = kv_cache.get(layer_id)
        # NHD paged layout with page size 1: [num_pages, 1, kv_heads, head_dim] (a free view).
        pages = (k_all.unsqueeze(1), v_all.unsqueeze(1))
        return self.wrapper.run(q.to(self.dtype).contiguous(), pages).to(q.dtype)
