"""Run one planned step on the target model and sample each finished chunk's next token.

This is the speculation-free generator ("--speculative-policy none").  Speculative policies
produce several tokens per request per step through the same (chunks in, tokens out) shape.
"""

from __future__ import annotations

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.managers.batch_planner import ScheduledChunk
from faser_sgl.managers.request import Request


class TargetOnlyGenerator:
    def __init__(self, runner, sampler, stop_checker):
        self.runner = runner
        self.sampler = sampler
        self.stop_checker = stop_checker

    def generate(self, chunks: list[ScheduledChunk]) -> dict[Request, list[int]]:
        """Forward all chunks in one pass; sample a token for each chunk that needs logits,
        append it (stop checker) and return what was appended."""
        if not chunks:
            return {}
        batch = ForwardBatch.build(
            new_tokens=[c.tokens for c in chunks],
            kv_slots=[c.req.kv_slots for c in chunks],
            logits_rows=[[len(c.tokens) - 1] if c.needs_logits else [] for c in chunks],
        )
        logits = self.runner.forward(batch)
        sampled_reqs = [c.req for c in chunks if c.needs_logits]
        if not sampled_reqs:
            return {}
        tokens = self.sampler.sample(
            logits,
            [r.sampling for r in sampled_reqs],
            [r.output_ids for r in sampled_reqs],
            [r.prompt_ids for r in sampled_reqs],
        )
        out = {}
        for req, token in zip(sampled_reqs, tokens.tolist()):
            out[req] = [token][: self.stop_checker.append(req, [token])]
        return out
