"""Continuous batching: which requests run this step, and with which KV slots.

Every step each running request either decodes (feeds its newest token) or prefills its next
chunk of uncached tokens, all in one ragged forward pass.  Decodes go first; prefill chunks
share what is left of the step's token budget.  KV slots are taken per step (page size 1), so a
request holds exactly the slots of its cached tokens.  When the pool runs dry, the most recently
arrived running request is retracted: its slots are freed and it goes back to the front of the
queue, to be recomputed from prompt + output later (its output so far is kept and was already
streamed).  Requests are validated on entry so that any single one fits the pool alone, which
makes retraction always able to make progress.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from faser_sgl.managers.request import Request


@dataclass
class ScheduledChunk:
    req: Request
    tokens: list[int]  # fed this step; their slots are the last len(tokens) of req.kv_slots
    needs_logits: bool  # the chunk reaches the end of the sequence: sample the next token


class BatchPlanner:
    def __init__(self, allocator, max_running_requests: int, max_step_tokens: int):
        self.allocator = allocator
        self.max_running_requests = max_running_requests
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_retractions = 0

    # -- queue bookkeeping -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def release(self, req: Request) -> None:
        """Free everything req holds and forget it (finished, aborted or failed)."""
        if req.kv_slots:
            self.allocator.free(req.kv_slots)
            req.kv_slots = []
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def abort(self, matches, reason: dict) -> list[Request]:
        """Finish every running or waiting request for which matches(req) holds with ``reason``,
        freeing all it holds; returns them (the caller reports them)."""
        victims = [r for r in [*self.running, *self.waiting] if matches(r)]
        for req in victims:
            self.release(req)
            req.finished_reason = reason
        return victims

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- planning ---------------------------------------------------------------------------
    def plan(self, extra_slots_per_decode: int = 0) -> list[ScheduledChunk]:
        """Admit what fits, give each running request its chunk, allocate slots.

        extra_slots_per_decode: additional slots a decoding request may need this step beyond its
        newest token (speculative verification feeds draft tokens too); those are allocated by
        the caller, the planner only keeps that much headroom when admitting.
        """
        self._admit(extra_slots_per_decode)
        budget = self.max_step_tokens
        chunks: list[ScheduledChunk] = []
        decoding = [r for r in self.running if r.num_uncached == 1]
        prefilling = [r for r in self.running if r.num_uncached > 1]
        for req in decoding:
            if req not in self.running:  # retracted while making room for an earlier one
                continue
            if not self._reserve(req, 1, protect=chunks):
                continue
            chunks.append(ScheduledChunk(req, req.all_ids[-1:], needs_logits=True))
            budget -= 1
        for req in prefilling:
            if budget <= 0 or req not in self.running:
                break
            pending = req.uncached_ids()
            take = min(len(pending), budget)
            if self.allocator.num_free < take:
                take = self.allocator.num_free
                if take <= 0:
                    break
            if not self._reserve(req, take, protect=chunks):
                break
            chunks.append(ScheduledChunk(req, pending[:take], needs_logits=take == len(pending)))
            budget -= take
        return chunks

    def would_admit(self, num_tokens: int, extra_slots_per_decode: int) -> bool:
        """Whether a new request of num_tokens prompt tokens would be admitted at the next plan
        (nothing waits before it, and it fits beside the running requests' headroom)."""
        if self.waiting or len(self.running) >= self.max_running_requests:
            return False
        first_chunk = min(num_tokens, self.max_step_tokens - len(self.running))
        headroom = len(self.running) * (1 + extra_slots_per_decode)
        return first_chunk > 0 and self.allocator.num_free >= first_chunk + headroom

    def _admit(self, extra_slots_per_decode: int) -> None:
        budget = self.max_step_tokens - len(self.running)
        while self.waiting and len(self.running) < self.max_running_requests and budget > 0:
            req = self.waiting[0]
            first_chunk = min(req.num_uncached, budget)
            headroom = len(self.running) * (1 + extra_slots_per_decode)
            if self.allocator.num_free < first_chunk + headroom:
                break
            self.waiting.popleft()
            self.running.append(req)
            budget -= first_chunk

    def _reserve(self, req: Request, n: int, protect: list[ScheduledChunk]) -> bool:
        """Allocate n slots for req, retracting later arrivals if the pool is dry."""
        while True:
            slots = self.allocator.alloc(n)
            if slots is not None:
                req.kv_slots.extend(slots)
                return True
            protected = {id(c.req) for c in protect} | {id(req)}
            victim = next((r for r in reversed(self.running) if id(r) not in protected), None)
            if victim is None:
                return False
            self.retract(victim)

    def retract(self, req: Request) -> None:
        self.allocator.free(req.kv_slots)
        req.kv_slots = []
        req.draft_cached = 0
        req.retraction_count += 1
        self.num_retractions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def take_back(self, chunk: ScheduledChunk) -> None:
        """Return the slots of a chunk that was planned but will not run."""
        n = len(chunk.tokens)
        self.allocator.free(chunk.req.kv_slots[-n:])
        del chunk.req.kv_slots[-n:]
