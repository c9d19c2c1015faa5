"""A loaded model with its KV cache, slot allocator and attention backend: the executor's
single entry point for the scheduler.

Pool size (KV slots), first match wins: ``num_kv_slots``; ``max_total_tokens`` (SGLang's flag of
that name); else a memory budget measured after the weights are loaded: ``mem_fraction`` of free
GPU memory on CUDA, or of available RAM on CPU, where it is also capped at CPU_CONTEXTS_CAP full
contexts because a CPU never serves enough concurrent long requests to use more.  Or, given
``mem_fraction_static`` (SGLang's ``--mem-fraction-static``), SGLang's rule: the weights and the
KV pools together take that fraction of the device's whole memory (the GPU's, or the machine's
RAM on a CPU), so the pools get what is free after loading less the (1 - fraction) of the total
kept for everything else; no cap, since the user sized it.

A draft model shares the target's slot numbering, so its pool has the same slot count.  Its
runner is built first with ``defer_kv=True`` (weights only) and passed to the target's as
``draft``: the target then sizes one budget for both pools (bytes per slot = both models' KV
bytes per token, measured after both models' weights are loaded) and allocates both.
"""

from __future__ import annotations

import torch

from faser_sgl.executor.attention import create_backend
from faser_sgl.executor.device import indexed_device
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.kv_cache import KVCache, SlotAllocator, kv_bytes_per_token, slots_for_budget
from faser_sgl.executor.loader import load_model
from faser_sgl.executor.model import fuse_projections

DEFAULT_MEM_FRACTION = {"cuda": 0.8, "cpu": 0.3}
CPU_CONTEXTS_CAP = 4
MIN_KV_SLOTS = 16


class ModelRunner:
    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 attention_backend: str = "torch", num_kv_slots: int | None = None,
                 max_total_tokens: int | None = None, mem_fraction: float | None = None,
                 defer_kv: bool = False, draft: "ModelRunner | None" = None, cpu_linear: str = "auto",
                 share_weights_mmap: bool = False, mem_fraction_static: float | None = None):
        self.model_path = str(model_path)
        self.device = indexed_device(device)  # "cuda" -> "cuda:N" (executor/device.py says why)
        self.dtype = dtype
        if cpu_linear not in ("auto", "off"):
            raise ValueError(f"cpu_linear must be 'auto' or 'off', got {cpu_linear!r}")
        # share_weights_mmap (--faser-share-weights-mmap, CPU only): the weights stay views of
        # the checkpoint file's page cache, shared by every process that maps it, so neither
        # fused nor packed (both would be private copies).  Otherwise each weight is this
        # process's own anonymous memory, which the kernel cannot evict from under a pass.
        self.shares_weights = share_weights_mmap and self.device.type == "cpu"
        self.model, self.config = load_model(model_path, dtype=dtype, device=self.device,
                                             share_mapped=self.shares_weights)
        if not self.shares_weights:
            fuse_projections(self.model)
        cfg = self.config
        # cpu_linear "auto": on a float32 CPU model, each projection and the LM head in the one
        # form timing finds faster here (executor.cpu_linear: oneDNN-packed or plain), one copy
        # each; "off": torch's F.linear everywhere.
        self.linear_plan = None
        if cpu_linear == "auto" and self.device.type == "cpu" and dtype == torch.float32 \
                and not self.shares_weights:
            from faser_sgl.executor import cpu_linear as packed

            if packed.available():
                # A tied LM head stays the embedding matrix (F.linear): packing it would be a
                # second copy, since the embedding lookup needs the plain rows.
                self.linear_plan = packed.accelerate(self.model)
                if self.model.lm_head is not None:
                    self.model.logits_linear = self.model.lm_head
        self.attn = create_backend(attention_backend, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   dtype=dtype, device=self.device)
        self.num_kv_slots = None
        self.kv_cache = None
        self.allocator = None
        if defer_kv:
            return
        if draft is not None and draft.kv_cache is not None:
            raise ValueError("the draft's runner must be built with defer_kv=True, so that one "
                             "budget sizes both KV pools")
        self.allocate_kv(self._pool_size(num_kv_slots or max_total_tokens, mem_fraction, draft,
                                         mem_fraction_static))
        if draft is not None:
            draft.allocate_kv(self.num_kv_slots)

    def allocate_kv(self, num_slots: int) -> None:
        """The KV cache and slot allocator of a runner built with defer_kv=True."""
        if self.kv_cache is not None:
            raise RuntimeError(f"{self.model_path} already has a KV pool")
        self.num_kv_slots = int(num_slots)
        self.kv_cache = KVCache.for_model(self.config, self.num_kv_slots, self.dtype, self.device)
        self.allocator = SlotAllocator(self.num_kv_slots)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context_len(self) -> int:
        return self.config.max_position_embeddings

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.config.eos_token_ids)

    def _pool_size(self, requested: int | None, mem_fraction: float | None,
                   draft: "ModelRunner | None" = None, mem_fraction_static: float | None = None) -> int:
        if requested is not None:
            if requested < 1:
                raise ValueError(f"the KV pool needs at least one slot, got {requested}")
            return int(requested)
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        if kind == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            cap = None
        else:
            free, total = _available_ram(), _total_ram()
            cap = CPU_CONTEXTS_CAP * self.max_context_len
        if mem_fraction_static is not None:
            if not 0 < mem_fraction_static <= 1:
                raise ValueError(f"--mem-fraction-static must be in (0, 1], got {mem_fraction_static}")
            budget = int(free - (1 - mem_fraction_static) * total)
            cap = None
            where = (f"{mem_fraction_static:.0%} of {total / 2**30:.2f} GiB for weights and KV, with "
                     f"{(total - free) / 2**30:.2f} GiB in use after loading the weights")
        else:
            fraction = DEFAULT_MEM_FRACTION[kind] if mem_fraction is None else mem_fraction
            budget = int(free * fraction)
            where = f"{fraction:.0%} of {free / 2**30:.2f} GiB free"
        # Every slot holds a token's KV in the target's pool and in the draft's, and free memory
        # was read after both models' weights were loaded, so one budget covers both pools.
        own = kv_bytes_per_token(self.config, self.dtype)
        draft_own = 0 if draft is None else kv_bytes_per_token(draft.config, draft.dtype)
        per_token = own + draft_own
        slots = slots_for_budget(per_token, max(budget, 0), max_slots=cap, min_slots=0)
        if slots < MIN_KV_SLOTS:
            detail = f"{per_token} bytes per token"
            if draft is not None:
                detail += (f": {own} for the target {self.model_path} + "
                           f"{draft_own} for the draft {draft.model_path}")
            raise RuntimeError(
                f"only {slots} KV slots fit in {where} ({detail}); pass max_total_tokens or free memory"
            )
        return slots

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [len(batch.logits_indices), vocab] for one ragged batch."""
        if batch.input_ids.device != self.device:
            batch = batch.to(self.device)
        return self.model(batch, self.kv_cache, self.attn)


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is in the lock file, but stay usable without it
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _total_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        import os

        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
