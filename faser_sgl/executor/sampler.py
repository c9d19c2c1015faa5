"""Token sampling with SGLang's sampling-parameter semantics, in torch.

Per request: penalties over its output tokens (repetition: divide positive / multiply negative
logits; frequency: subtract count * penalty; presence: subtract penalty once), stop tokens masked
until min_new_tokens, logit_bias, then temperature, top-k, top-p, min-p.  Greedy is top_k == 1
(SGLang turns temperature 0 into top_k = 1).  ``probs`` exposes the final distribution because
speculative rejection sampling needs the target's and the draft's exactly as they would sample.
Rows may belong to different requests, each with its own seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

TOP_K_ALL = 1 << 30
_EPS = 1e-6


@dataclass(eq=False)
class SamplingOptions:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: Optional[dict[int, float]] = None
    generator: Optional[torch.Generator] = field(default=None, repr=False)

    @property
    def is_greedy(self) -> bool:
        return self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.repetition_penalty != 1.0 or self.min_new_tokens > 0 or bool(self.logit_bias))

    @staticmethod
    def from_sglang(sp, vocab_size: int, stop_token_ids=()) -> "SamplingOptions":
        """Build from an sglang SamplingParams (read by attribute: no sglang import here)."""
        temperature = float(getattr(sp, "temperature", 1.0) if getattr(sp, "temperature", None) is not None else 1.0)
        top_k = getattr(sp, "top_k", TOP_K_ALL)
        top_k = TOP_K_ALL if top_k in (None, -1) else int(top_k)
        if temperature < _EPS:
            temperature, top_k = 1.0, 1
        opts = SamplingOptions(
            temperature=temperature,
            top_p=float(getattr(sp, "top_p", 1.0) or 1.0),
            top_k=top_k,
            min_p=float(getattr(sp, "min_p", 0.0) or 0.0),
            frequency_penalty=float(getattr(sp, "frequency_penalty", 0.0) or 0.0),
            presence_penalty=float(getattr(sp, "presence_penalty", 0.0) or 0.0),
            repetition_penalty=float(getattr(sp, "repetition_penalty", 1.0) or 1.0),
            min_new_tokens=int(getattr(sp, "min_new_tokens", 0) or 0),
            stop_token_ids=tuple(stop_token_ids),
            logit_bias={int(k): float(v) for k, v in (getattr(sp, "logit_bias", None) or {}).items()} or None,
        )
        opts.validate(vocab_size)
        seed = getattr(sp, "sampling_seed", None)
        if not opts.is_greedy:
            opts.generator = torch.Generator()
            if seed is not None:
                opts.generator.manual_seed(int(seed) % (1 << 63))
            else:
                opts.generator.seed()
        return opts

    def validate(self, vocab_size: int) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be -1 (all) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for k in self.logit_bias or {}:
            if not 0 <= k < vocab_size:
                raise ValueError(f"logit_bias token {k} is outside the vocabulary")


class Sampler:
    def penalized_logits(self, logits: torch.Tensor, options: list[SamplingOptions],
                         histories: list[list[int]]) -> torch.Tensor:
        """Apply each row's penalties given the output tokens before that row."""
        if not any(o.has_penalties for o in options):
            return logits
        logits = logits.clone()
        for i, (o, hist) in enumerate(zip(options, histories)):
            if not o.has_penalties:
                continue
            row = logits[i]
            if hist and (o.frequency_penalty or o.presence_penalty or o.repetition_penalty != 1.0):
                ids, counts = torch.unique(torch.tensor(hist, device=row.device), return_counts=True)
                if o.repetition_penalty != 1.0:
                    vals = row[ids]
                    row[ids] = torch.where(vals < 0, vals * o.repetition_penalty, vals / o.repetition_penalty)
                if o.frequency_penalty:
                    row[ids] -= o.frequency_penalty * counts.to(row.dtype)
                if o.presence_penalty:
                    row[ids] -= o.presence_penalty
            if o.logit_bias:
                for tok, bias in o.logit_bias.items():
                    row[tok] += bias
            if len(hist) < o.min_new_tokens and o.stop_token_ids:
                row[list(o.stop_token_ids)] = float("-inf")
        return logits

    def greedy_tokens(self, logits, options, histories, prompts=None) -> torch.Tensor:
        return torch.argmax(self.penalized_logits(logits, options, histories), dim=-1)

    def probs(self, logits: torch.Tensor, options: list[SamplingOptions],
              histories: list[list[int]], prompts=None) -> torch.Tensor:
        """The distribution each row samples from: [N, V] float32, rows sum to 1.
        Greedy rows are one-hot at their argmax."""
        logits = self.penalized_logits(logits.float(), options, histories)
        temps = torch.tensor([o.temperature for o in options], dtype=logits.dtype, device=logits.device)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        for i, o in enumerate(options):
            if o.is_greedy:
                onehot = torch.zeros_like(probs[i])
                onehot[torch.argmax(logits[i])] = 1.0
                probs[i] = onehot
            elif o.top_k < probs.shape[-1] or o.top_p < 1.0 or o.min_p > 0.0:
                probs[i] = _filter(probs[i], o)
        return probs

    def sample(self, logits: torch.Tensor, options: list[SamplingOptions],
               histories: list[list[int]], prompts=None) -> torch.Tensor:
        """One token per row: [N] int64."""
        if all(o.is_greedy for o in options):
            return self.greedy_tokens(logits, options, histories)
        probs = self.probs(logits, options, histories)
        out = torch.empty(len(options), dtype=torch.int64)
        for i, o in enumerate(options):
            if o.is_greedy:
                out[i] = torch.argmax(probs[i])
            else:
                out[i] = torch.multinomial(probs[i].cpu(), 1, generator=o.generator)[0]
        return out


def _filter(p: torch.Tensor, o: SamplingOptions) -> torch.Tensor:
    """top-k, then top-p, then min-p on one probability row; renormalized."""
    sorted_p, idx = torch.sort(p, descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if o.top_k < p.numel():
        keep[o.top_k:] = False
    if o.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        mass_before = torch.cumsum(sorted_p, 0) - sorted_p
        keep &= mass_before < o.top_p
    if o.min_p > 0.0:
        keep &= sorted_p >= o.min_p * sorted_p[0]
    keep[0] = True
    filtered = torch.zeros_like(p)
    filtered[idx[keep]] = sorted_p[keep]
    return filtered / filtered.sum()
