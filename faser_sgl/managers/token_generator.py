"""Run one planned step on the target model and sample each finished chunk's next token.

This is the speculation-free generator ("--speculative-policy none").  Speculative policies
produce several tokens per request per step through the same (chunks in, tokens out) shape.
"""

from __future__ import annotations

import time

import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.managers import logit_processor, logprobs
from faser_sgl.managers.batch_planner import ScheduledChunk
from faser_sgl.managers.request import Request


class TargetOnlyGenerator:
    def __init__(self, runner, sampler, stop_checker):
        self.runner = runner
        self.sampler = sampler
        self.stop_checker = stop_checker
        self.on_pass = None  # (model, tokens, seconds) of every pass: --faser-record-steps

    def generate(self, chunks: list[ScheduledChunk]) -> dict[Request, list[int]]:
        """Forward all chunks in one pass; sample a token for each chunk that needs logits,
        append it (stop checker) and return what was appended."""
        if not chunks:
            return {}
        plan = logprobs.input_row_plan(chunks)
        rows = [extra + ([len(c.tokens) - 1] if c.needs_logits else []) for extra, c in zip(plan, chunks)]
        batch = ForwardBatch.build(
            new_tokens=[c.tokens for c in chunks],
            kv_slots=[c.req.kv_slots for c in chunks],
            logits_rows=rows,
        )
        start = time.perf_counter()
        logits = self.runner.forward(batch)
        if self.on_pass is not None:
            if logits.is_cuda:  # (kernels are asynchronous: time their end)
                torch.cuda.current_stream(logits.device).synchronize()
            self.on_pass("target", sum(len(c.tokens) for c in chunks), time.perf_counter() - start)
        logits = logprobs.consume_input_rows(chunks, plan, [len(r) for r in rows], logits)
        sampled_reqs = [c.req for c in chunks if c.needs_logits]
        if not sampled_reqs:
            return {}
        if any(r.grammar is not None or r.logit_processor is not None for r in sampled_reqs):
            logits = logits.clone()  # (the forward's output is an inference tensor)
            for i, req in enumerate(sampled_reqs):
                if req.grammar is not None:  # forbidden tokens get -inf, for logprobs too
                    from faser_sgl.managers.grammar import apply_mask  # (xgrammar: only with grammars)

                    apply_mask(logits[i], req.grammar.mask())
                if req.logit_processor is not None:  # after the mask, as in SGLang
                    logits[i: i + 1] = logit_processor.apply(req, logits[i: i + 1])
        tokens = self.sampler.sample(
            logits,
            [r.sampling for r in sampled_reqs],
            [r.output_ids for r in sampled_reqs],
            [r.prompt_ids for r in sampled_reqs],
        )
        out = {}
        for i, (req, token) in enumerate(zip(sampled_reqs, tokens.tolist())):
            kept = self.stop_checker.append(req, [token])
            if req.logprobs is not None and (kept or req.stop.max_new_tokens == 0):
                history = req.output_ids[:len(req.output_ids) - kept]  # the output before the token
                req.logprobs.outputs.extend(logprobs.kept_entries(req, logprobs.emitted_entries(
                    self.sampler, req, logits[i: i + 1], [history], [token]), kept))
            if kept and req.grammar is not None:
                req.grammar.commit([token])
            out[req] = [token][:kept]
        return out
