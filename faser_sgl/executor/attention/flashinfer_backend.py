"""CUDA attention through FlashInfer's paged prefill kernel (page size 1).

One BatchPrefillWithPagedKVCacheWrapper plan per forward pass serves every layer: ragged query
runs (qo_indptr) over each request's KV pages (kv_indptr / kv_indices), causal aligned to the end
of the request's KV, which is exactly what prefill, decode and draft verification need.  The
torch backend is its CPU twin; tests compare the two on a GPU.
"""

from __future__ import annotations

import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache

WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, device: str = "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("the flashinfer attention backend needs a CUDA device")
        try:
            import flashinfer
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise RuntimeError("flashinfer-python is not installed (requirements/cuda.txt)") from err
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
        self._q_dtype = self._kv_dtype = torch.bfloat16

    def begin_forward(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        num_reqs = batch.batch_size
        self.wrapper.plan(
            batch.qo_indptr.to(device=device, dtype=torch.int32),
            batch.kv_indptr.to(device=device, dtype=torch.int32),
            batch.kv_indices.to(device=device, dtype=torch.int32),
            torch.ones(num_reqs, dtype=torch.int32, device=device),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            1,  # page size
            causal=True,
            sm_scale=self.head_dim ** -0.5,
            q_data_type=self._q_dtype,
            kv_data_type=self._kv_dtype,
        )

    def set_dtypes(self, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        self._q_dtype, self._kv_dtype = q_dtype, kv_dtype

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        kv_cache.write(layer, batch.out_cache_loc, k, v)
        # NHD paged layout: [num_pages, page_size=1, kv_heads, head_dim].
        k_pages = kv_cache.k[layer].unsqueeze(1)
        v_pages = kv_cache.v[layer].unsqueeze(1)
        return self.wrapper.run(q.contiguous(), (k_pages, v_pages))
