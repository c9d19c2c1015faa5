"""The one batch representation that every forward pass of every model takes.

A batch is a ragged list of requests.  Request i brings q_i new tokens (a prefill chunk, one
decode token, or a run of draft tokens to verify) and sees kv_i = prefix_i + q_i cached tokens
after they are written.  Page size is 1: each token owns one slot of the paged KV pool, so a
request's KV is just a list of slot indices (``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``) whose
last q_i entries are the slots of its new tokens (``out_cache_loc``).

Attention is causal, aligned to the end of each request's KV: new token j of request i (at
absolute position kv_i - q_i + j) sees KV entries 0 .. kv_i - q_i + j.  That single rule serves
prefill, decode and ragged verification alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64, new tokens of all requests, request-major
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    qo_indptr: torch.Tensor  # [B+1] int64, new-token offsets per request
    kv_indptr: torch.Tensor  # [B+1] int64, offsets into kv_indices per request
    kv_indices: torch.Tensor  # [sum kv_i] int64, KV slot of every cached token, in order
    out_cache_loc: torch.Tensor  # [T] int64, slot each new token's K/V is written to
    logits_indices: torch.Tensor  # [L] int64, rows of the T new tokens that need logits

    @property
    def batch_size(self) -> int:
        return self.qo_indptr.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> "ForwardBatch":
        return ForwardBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})

    @staticmethod
    def build(
        new_tokens: list[list[int]],
        kv_slots: list[list[int]],
        logits_rows: list[list[int]],
    ) -> "ForwardBatch":
        """Build a batch from per-request lists.

        new_tokens[i]:  the q_i token ids request i feeds this step.
        kv_slots[i]:    all kv_i slots of request i, the new tokens' slots last.
        logits_rows[i]: which of request i's q_i new tokens need logits (indices in 0..q_i-1).
        """
        ids, pos, out_loc, kv_flat, logit_rows = [], [], [], [], []
        qo, kv = [0], [0]
        for toks, slots, rows in zip(new_tokens, kv_slots, logits_rows):
            q, k = len(toks), len(slots)
            if q > k:
                raise ValueError(f"{q} new tokens but only {k} KV slots")
            start = k - q
            base = qo[-1]
            ids.extend(toks)
            pos.extend(range(start, k))
            out_loc.extend(slots[start:])
            kv_flat.extend(slots)
            logit_rows.extend(base + r for r in rows)
            qo.append(base + q)
            kv.append(kv[-1] + k)

        def t(x: list[int]) -> torch.Tensor:
            # Built on the host; ModelRunner.forward moves the batch to the model's device.
            return torch.tensor(x, dtype=torch.int64, device="cpu")

        return ForwardBatch(
            input_ids=t(ids),
            positions=t(pos),
            qo_indptr=t(qo),
            kv_indptr=t(kv),
            kv_indices=t(kv_flat),
            out_cache_loc=t(out_loc),
            logits_indices=t(logit_rows),
        )

    def truncate(self, new_q: list[int]) -> "ForwardBatch":
        """The batch with request i's new tokens cut to its first new_q[i] (<= q_i): the tail
        tokens leave with their KV slots and logits rows, as when verification prunes a request's
        last draft tokens mid-pass.  Logits rows of the kept tokens keep their order."""
        qo = self.qo_indptr.tolist()
        kv = self.kv_indptr.tolist()
        if len(new_q) != len(qo) - 1:
            raise ValueError(f"{len(new_q)} lengths for a batch of {len(qo) - 1} requests")
        keep_rows, kv_keep = [], []
        new_qo, new_kv = [0], [0]
        for i, q in enumerate(new_q):
            old_q = qo[i + 1] - qo[i]
            if not 0 <= q <= old_q:
                raise ValueError(f"request {i}: cannot cut {old_q} new tokens to {q}")
            keep_rows.extend(range(qo[i], qo[i] + q))
            kv_len = kv[i + 1] - kv[i] - (old_q - q)
            kv_keep.extend(range(kv[i], kv[i] + kv_len))
            new_qo.append(new_qo[-1] + q)
            new_kv.append(new_kv[-1] + kv_len)
        device = self.input_ids.device
        rows = torch.tensor(keep_rows, dtype=torch.int64, device=device)
        # Old row -> new row (-1 for dropped rows), to renumber the logits rows that survive.
        renumber = torch.full((self.num_tokens,), -1, dtype=torch.int64, device=device)
        renumber[rows] = torch.arange(rows.numel(), device=device)
        logits = renumber[self.logits_indices]

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        return ForwardBatch(
            input_ids=self.input_ids[rows],
            positions=self.positions[rows],
            qo_indptr=t(new_qo),
            kv_indptr=t(new_kv),
            kv_indices=self.kv_indices[t(kv_keep)],
            out_cache_loc=self.out_cache_loc[rows],
            logits_indices=logits[logits >= 0],
        )
