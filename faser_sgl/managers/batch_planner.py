"""Continuous batching: which requests run this step, and with which KV slots.

Every step each running request either decodes (feeds its newest token) or prefills its next
chunk of uncached tokens, all in one ragged forward pass.  Decodes go first; prefill chunks
share what is left of the step's token budget.  KV slots are taken per step (page size 1), so a
request holds exactly the slots of its cached tokens.  When the pool runs dry, the most recently
arrived running request is retracted: its slots are freed and it goes back to the front of the
queue, to be recomputed from prompt + output later (its output so far is kept and was already
streamed).  Requests are validated on entry so that any single one fits the pool alone, which
makes retraction always able to make progress.

Admission keeps room for what the running requests will still decode (SGLang's
new_token_ratio, managers/decode_reservation.py), so that retraction stays the exception under
bursts rather than the way a full pool is discovered.

With a prefix cache (managers/prefix_cache.py), admission first takes the longest cached prefix
of the request's tokens (its slots are shared and locked, not copied), and a request that
finishes, is aborted or is retracted hands its KV to the cache instead of freeing it; the cache
gives slots back, least recently used first, when an allocation finds the pool dry.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from faser_sgl.managers.decode_reservation import DecodeReservation
from faser_sgl.managers.request import Request


@dataclass
class ScheduledChunk:
    req: Request
    tokens: list[int]  # fed this step; their slots are the last len(tokens) of req.kv_slots
    needs_logits: bool  # the chunk reaches the end of the sequence: sample the next token


class BatchPlanner:
    # SGLang's --schedule-policy values this planner serves; lpm needs the prefix cache (without
    # it SGLang falls back to fcfs too), and above this many waiting requests the matching costs
    # more than it wins, so the queue stays in arrival order (SGLang's limit).
    SCHEDULE_POLICIES = ("fcfs", "lpm")
    LPM_MAX_WAITING = 128

    def __init__(self, allocator, max_running_requests: int, max_step_tokens: int, prefix_cache=None,
                 schedule_policy: str = "fcfs", conservativeness: float = 1.0, test_retract_interval: int = 0,
                 prefill_max_requests: int | None = None):
        """prefill_max_requests: at most this many requests carry a prefill chunk in one step,
        continuing ones included (SGLang's --prefill-max-requests caps its prefill batch so);
        None: no limit.

        test_retract_interval N > 0: every N-th plan retracts the newest of two or more decoding
        requests, whatever room is left (SGLang's SGLANG_TEST_RETRACT / _INTERVAL): admission
        that keeps room for decoding makes a real retraction rare, and tests of what follows one
        must still see it."""
        if schedule_policy not in self.SCHEDULE_POLICIES:
            raise ValueError(f"schedule policy {schedule_policy!r} is not one of {self.SCHEDULE_POLICIES}")
        self.allocator = allocator
        self.prefix_cache = prefix_cache
        self.schedule_policy = schedule_policy if prefix_cache is not None else "fcfs"
        self.max_running_requests = max_running_requests
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_retractions = 0
        self.reservation = DecodeReservation(conservativeness)
        self.test_retract_interval = test_retract_interval
        if prefill_max_requests is not None and prefill_max_requests < 1:
            raise ValueError(f"--prefill-max-requests must be at least 1, got {prefill_max_requests}")
        self.prefill_max_requests = prefill_max_requests
        self._num_plans = 0

    # -- queue bookkeeping -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def release(self, req: Request, keep_kv: bool = True) -> None:
        """Free everything req holds and forget it (finished, aborted or failed).  keep_kv:
        the request's KV may go to the prefix cache (False after a failed forward pass, whose
        KV is not trusted)."""
        self._drop_kv(req, keep_kv)
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
        retractions_before = self.num_retractions
        self._num_plans += 1
        if self.test_retract_interval > 0 and self._num_plans % self.test_retract_interval == 0:
            decoding = [r for r in self.running if r.num_uncached == 1]
            if len(decoding) >= 2:
                self.retract(decoding[-1])
                self.reservation.retracted(self.running)
        budget = self.max_step_tokens
        chunks: list[ScheduledChunk] = []
        # A suspect (a request that was in a failed pass) runs alone through its recomputation
        # and one decode step (drafts included): a failure then names it, and a success clears
        # it, whatever else failed around it (Scheduler._recover_from_failed_step).
        suspect = next((r for r in self.running if r.suspect), None)
        batch = [suspect] if suspect is not None else self.running
        decoding = [r for r in batch if r.num_uncached == 1]
        prefilling = [r for r in batch if r.num_uncached > 1]
        for req in decoding:
            if req not in self.running:  # retracted while making room for an earlier one
                continue
            if not self._reserve(req, 1, protect=chunks):
                continue
            chunks.append(ScheduledChunk(req, req.all_ids[-1:], needs_logits=True))
            budget -= 1
        decoded = bool(chunks)
        if self.prefill_max_requests is not None:
            prefilling = prefilling[:self.prefill_max_requests]
        for req in prefilling:
            if budget <= 0 or req not in self.running:
                break
            pending = req.uncached_ids()
            take = min(len(pending), budget)
            if self.allocator.num_available < take:
                # What is free; none: one slot, which _reserve takes from later arrivals (else
                # prefills that filled the pool between them would all wait for each other).
                take = max(self.allocator.num_available, 1)
            if not self._reserve(req, take, protect=chunks):
                break
            chunks.append(ScheduledChunk(req, pending[:take], needs_logits=take == len(pending)))
            budget -= take
        if decoded and self.num_retractions == retractions_before:
            self.reservation.decoded_without_retraction()
        return chunks

    def would_admit(self, num_tokens: int, extra_slots_per_decode: int, max_new_tokens: int = 0) -> bool:
        """Whether a new request of num_tokens prompt tokens (and max_new_tokens to generate)
        would be admitted at the next plan: nothing waits before it, its first chunk fits beside
        the running requests' headroom, and it fits beside what they keep for decoding."""
        if self.waiting or len(self.running) >= self.max_running_requests or self._prefill_room() < 1:
            return False
        first_chunk = min(num_tokens, self.max_step_tokens - len(self.running))
        headroom = len(self.running) * (1 + extra_slots_per_decode)
        if first_chunk <= 0 or self.allocator.num_available < first_chunk + headroom:
            return False
        needed = num_tokens + min(max_new_tokens, self.reservation.clip) + extra_slots_per_decode
        return not self.running or self._fits_beside_running(needed, self._kept_for_running(extra_slots_per_decode))

    def _fits_beside_running(self, needed: float, kept: float) -> bool:
        """Whether a new request needing ``needed`` slots fits beside the ``kept`` ones of the
        running requests (num_available counts what the prefix cache would give back)."""
        return needed < self.allocator.num_available - kept

    def _kept_for_running(self, extra_slots_per_decode: int) -> float:
        """Slots the running requests will still take: their uncached tokens, their draft
        headroom, and the reserved share of their remaining output."""
        return sum(r.num_uncached + extra_slots_per_decode + self.reservation.future_tokens(r)
                   for r in self.running)

    def describe(self) -> dict:
        """The state the progress watchdog logs when nothing could be planned for too long."""
        return {"waiting": len(self.waiting), "running": len(self.running),
                "free_slots": self.allocator.num_available, "pool_slots": self.allocator.num_total,
                "step_budget_tokens": self.max_step_tokens,
                "max_running_requests": self.max_running_requests,
                "retractions": self.num_retractions,
                "new_token_ratio": round(self.reservation.ratio, 4)}

    def why_never_admitted(self, req: Request, extra_slots_per_decode: int = 0) -> str | None:
        """Why ``req`` could not start even with nothing else running, or None if it could: what
        the progress watchdog tells a request that waited past its deadline."""
        if self.max_running_requests < 1:
            return f"the server runs at most {self.max_running_requests} requests at once"
        if self.max_step_tokens < 1:
            return f"a step may carry {self.max_step_tokens} tokens, so no prompt can start"
        first_chunk = min(req.num_uncached, self.max_step_tokens)
        if first_chunk + extra_slots_per_decode > self.allocator.num_total:
            return (f"its first {first_chunk} tokens need more KV slots than the pool's "
                    f"{self.allocator.num_total}")
        return None

    def _next_admissible(self) -> Request | None:
        """The waiting head, unless it is a suspect and one already runs (then the first
        non-suspect behind it, which runs once no suspect does)."""
        if not any(r.suspect for r in self.running):
            return self.waiting[0]
        return next((r for r in self.waiting if not r.suspect), None)

    def _order_waiting(self) -> None:
        """lpm: the waiting requests with the longest cached prefix first (ties, and every
        request when the queue is long, in arrival order), so that requests sharing a prefix
        run while it is cached."""
        if self.schedule_policy != "lpm" or not 1 < len(self.waiting) <= self.LPM_MAX_WAITING:
            return
        cache = self.prefix_cache
        self.waiting = deque(sorted(self.waiting, key=lambda r: -cache.matched_len(r.all_ids, r.num_tokens - 1)))

    def _admit(self, extra_slots_per_decode: int) -> None:
        self._order_waiting()
        budget = self.max_step_tokens - len(self.running)
        kept = self._kept_for_running(extra_slots_per_decode)
        prefill_room = self._prefill_room()
        while self.waiting and len(self.running) < self.max_running_requests and budget > 0 and prefill_room > 0:
            req = self._next_admissible()
            if req is None:
                break
            if self.prefix_cache is not None and req.prefix_handle is None:
                self._take_prefix(req)
            first_chunk = min(req.num_uncached, budget)
            headroom = len(self.running) * (1 + extra_slots_per_decode)
            if self.allocator.num_available < first_chunk + headroom:
                # It keeps its matched prefix (locked) while it waits: the cache's hit counts
                # stay one lookup per admission, and the prefix it will need is not evicted.
                break
            # Its whole prompt and output budget must fit beside what the running requests keep
            # (SGLang admits against the whole budget too; the ratio applies once it runs).  With
            # nothing running it starts anyway: validated requests fit the pool alone.
            needed = self.reservation.new_request_tokens(req) + extra_slots_per_decode
            if self.running and not self._fits_beside_running(needed, kept):
                break
            self.waiting.remove(req)
            self.running.append(req)
            budget -= first_chunk
            kept += needed
            prefill_room -= 1

    def _prefill_room(self) -> float:
        """How many more requests may start a prefill this step (prefill_max_requests less the
        running requests still prefilling)."""
        if self.prefill_max_requests is None:
            return math.inf
        return self.prefill_max_requests - sum(1 for r in self.running if r.num_uncached > 1)

    def _reserve(self, req: Request, n: int, protect: list[ScheduledChunk]) -> bool:
        """Allocate n slots for req, retracting later arrivals if the pool is dry."""
        while True:
            slots = self.allocator.alloc(n)
            if slots is not None:
                req.kv_slots.extend(slots)
                return True
            if self._unlock_waiting_prefixes():
                continue  # their slots are evictable now; cheaper than retracting running work
            protected = {id(c.req) for c in protect} | {id(req)}
            victim = next((r for r in reversed(self.running) if id(r) not in protected), None)
            if victim is None:
                return False
            self.retract(victim)
            self.reservation.retracted(self.running)

    def _unlock_waiting_prefixes(self) -> bool:
        """Let waiting requests drop the cached prefixes they hold locked (they match again at
        admission).  Without this a running request that needs those slots would wait for a
        request that waits for it.  Returns whether any lock was dropped."""
        holders = [r for r in self.waiting if r.prefix_handle is not None]
        for req in holders:
            self._drop_kv(req)
        return bool(holders)

    def _take_prefix(self, req: Request) -> None:
        """Start req's KV from the longest cached prefix of its tokens (admission)."""
        limit = req.num_tokens - 1  # one token is always fed: its row gives the next token
        if req.cacheable_prefix is not None:
            limit = min(limit, req.cacheable_prefix)
        match = self.prefix_cache.match(req.all_ids, limit)
        req.prefix_handle, req.prefix_len = match.node, len(match.slots)
        req.kv_slots = list(match.slots)
        req.draft_cached = match.draft_len
        if req.retraction_count == 0 and not req.suspect:
            req.cached_tokens = len(match.slots)

    def _drop_kv(self, req: Request, keep_kv: bool = True) -> None:
        """Give req's KV slots back: to the prefix cache (which keeps the computed tokens'
        KV), or to the pool."""
        cache = self.prefix_cache
        if cache is None or req.prefix_handle is None:
            if req.kv_slots:
                self.allocator.free(req.kv_slots)
        else:
            # Slots past the output (drafts accepted beyond a stop) hold no kept token.
            n = min(len(req.kv_slots), req.num_tokens) if keep_kv else req.prefix_len
            if len(req.kv_slots) > n:
                self.allocator.free(req.kv_slots[n:])
            cache.release(req.prefix_handle, req.all_ids[:n], req.kv_slots[:n],
                          min(req.draft_cached, n) if keep_kv else 0)
            req.prefix_handle, req.prefix_len = None, 0
        req.kv_slots = []
        req.draft_cached = 0

    def retract(self, req: Request) -> None:
        self._drop_kv(req)
        req.retraction_count += 1
        self.num_retractions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def requeue_suspect(self, req: Request) -> None:
        """Back to the queue's head after a failed pass, with no KV (the pass's is not
        trusted): it is recomputed from prompt + output like a retracted request."""
        self._drop_kv(req, keep_kv=False)
        req.suspect = True
        if req in self.running:
            self.running.remove(req)
        self.waiting.appendleft(req)

    def take_back(self, chunk: ScheduledChunk) -> None:
        """Return the slots of a chunk that was planned but will not run."""
        n = len(chunk.tokens)
        self.allocator.free(chunk.req.kv_slots[-n:])
        del chunk.req.kv_slots[-n:]
