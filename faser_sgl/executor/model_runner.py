"""A loaded model with its KV cache, slot allocator and attention backend."""

from __future__ import annotations

import torch

from faser_sgl.executor.attention import create_backend
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache, SlotAllocator, kv_bytes_per_token
from faser_sgl.executor.loader import load_model


class ModelRunner:
    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 attention_backend: str = "torch", max_total_tokens: int | None = None,
                 mem_fraction: float = 0.3):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model, self.config = load_model(model_path, dtype=dtype, device=self.device)
        cfg = self.config
        num_slots = max_total_tokens or self._slots_from_memory(mem_fraction)
        self.kv_cache = KVCache(cfg.num_layers, num_slots, cfg.num_kv_heads, cfg.head_dim, dtype, self.device)
        self.allocator = SlotAllocator(num_slots)
        self.attn = create_backend(attention_backend, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   str(self.device))
        if hasattr(self.attn, "set_dtypes"):
            self.attn.set_dtypes(dtype, dtype)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context_len(self) -> int:
        return self.config.max_position_embeddings

    def _slots_from_memory(self, fraction: float) -> int:
        cfg = self.config
        per_token = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            import psutil

            free = psutil.virtual_memory().available
        return max(256, min(int(free * fraction) // per_token, 4 * cfg.max_position_embeddings))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] in float32."""
        if batch.input_ids.device != self.device:
            batch = batch.to(self.device)
        return self.model(batch, self.kv_cache, self.attn)
