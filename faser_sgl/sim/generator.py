"""Simulated step generators: the real speculative generator with its forward passes replaced.

``SimulatedGenerator`` subclasses the server's ``SpeculativeGenerator`` and keeps everything
that decides *what* a step does: the policy's lengths, their trimming to what a request may still
emit and to free slots, the draft model's lazy catch-up and its time budget, the preemption
check between draft passes, the stop checker, the roll-back of rejected drafts' slots, the
acceptance counters and the policy's feedback (``observe``, ``observe_forward``,
``observe_pruning``).  Only ``_run_step`` (and ``calibrate``) are replaced: each pass advances the
virtual clock by the cost profile's time for its token count (and, where the profile has a
context term, for the context its attention reads: each request's cached tokens + the tokens it
feeds, i.e. the KV slots the real pass attends over) instead of running a model, the tokens are
dummies, and the acceptance model says how many drafts the target accepts.

Step timing (serial draft-then-verify, as ``SpeculativeGenerator``): max(k_i) draft passes
(the first feeds every drafting request's unseen tokens, each later one a row per request still
drafting), then one target pass over every chunk's tokens plus every draft.  FASER's frontier
pipeline, which overlaps draft and target passes, is ``pipeline.SimulatedFrontierGenerator``, a
subclass of the real ``FrontierGenerator`` and of this one.
"""

from __future__ import annotations

import numpy as np

from faser_sgl.managers.batch_planner import ScheduledChunk
from faser_sgl.managers.request import Request
from faser_sgl.speculative.early_exit import Verification
from faser_sgl.speculative.spec_generator import DraftPreempted, SpeculativeGenerator

DUMMY_TOKEN = 1  # only lengths matter; no stop token is ever set, so output ends by length


class SimClock:
    """Virtual seconds since the workload started; nothing here reads a wall clock."""

    def __init__(self):
        self.now = 0.0


class SimExecutor:
    """Prices forward passes from the cost profile and advances the clock."""

    def __init__(self, profile, clock: SimClock, noise_cv: float = 0.0, rng: np.random.Generator | None = None):
        self.profile = profile
        self.clock = clock
        self.noise_cv = noise_cv
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.passes = {"target": 0, "draft": 0}
        self.busy_s = {"target": 0.0, "draft": 0.0}
        # Tokens and context (KV tokens read) of the passes charged, and target passes by size
        # (powers of two: "<=N" tokens), for the record.
        self.tokens = {"target": 0, "draft": 0}
        self.context = {"target": 0, "draft": 0}
        self.target_pass_sizes: dict[str, int] = {}

    def noise(self) -> float:
        """A multiplicative jitter with mean 1 (lognormal), as real passes vary run to run."""
        if self.noise_cv <= 0:
            return 1.0
        sigma2 = np.log1p(self.noise_cv ** 2)
        return float(self.rng.lognormal(-sigma2 / 2, np.sqrt(sigma2)))

    def seconds(self, model: str, tokens: int, context: int = 0) -> float:
        """A pass over ``tokens`` tokens whose attention reads ``context`` KV tokens in all."""
        return self.profile.seconds(model, tokens, context)

    def charge(self, model: str, seconds: float, advance: bool = True, tokens: int = 0,
               context: int = 0) -> float:
        """Count one pass (with jitter) and return its seconds; ``advance=False``: the caller
        moves the clock itself (a pipeline round lasts as long as its slower side).  ``tokens``
        and ``context`` are only counted, for the record."""
        seconds *= self.noise()
        if advance:
            self.clock.now += seconds
        self.passes[model] += 1
        self.busy_s[model] += seconds
        self.tokens[model] += tokens
        self.context[model] += context
        if model == "target" and tokens:
            bucket = f"<={1 << max(0, int(tokens - 1).bit_length())}"
            self.target_pass_sizes[bucket] = self.target_pass_sizes.get(bucket, 0) + 1
        return seconds

    def stats(self) -> dict:
        return {"tokens": dict(self.tokens), "context": dict(self.context),
                "target_pass_sizes": dict(sorted(self.target_pass_sizes.items(),
                                                 key=lambda kv: int(kv[0][2:])))}


class SimulatedTargetOnly:
    """``--speculative-policy none``: one target pass per step, one token per finished chunk."""

    num_verify_steps = num_drafted = num_accepted = num_preempted_steps = 0

    def __init__(self, executor: SimExecutor, stop_checker):
        self.executor = executor
        self.stop_checker = stop_checker

    def calibrate(self) -> float:
        return 0.0

    def generate(self, chunks: list[ScheduledChunk]) -> dict[Request, list[int]]:
        if not chunks:
            return {}
        tokens = sum(len(c.tokens) for c in chunks)
        # Each chunk's slots are the last of its request's kv_slots: its attention reads them all.
        context = sum(len(c.req.kv_slots) for c in chunks)
        self.executor.charge("target", self.executor.seconds("target", tokens, context),
                             tokens=tokens, context=context)
        out = {}
        for c in chunks:
            if c.needs_logits:
                kept = self.stop_checker.append(c.req, [DUMMY_TOKEN])
                out[c.req] = [DUMMY_TOKEN][:kept]
        return out


class SimulatedGenerator(SpeculativeGenerator):
    def __init__(self, executor: SimExecutor, policy, allocator, stop_checker, max_step_tokens,
                 acceptance_of, early_exit=None):
        """``acceptance_of(req)``: the request's ``acceptance.MatchSequence``; ``early_exit``: a
        ``exit_model.SimulatedEarlyExit`` or None."""
        super().__init__(None, None, None, policy, allocator, stop_checker, max_step_tokens, early_exit)
        self.executor = executor
        self.acceptance_of = acceptance_of
        self.num_pruned_rows = 0

    # -- passes --------------------------------------------------------------------------------
    def _pass(self, model: str, tokens: int, context: int = 0) -> None:
        seconds = self.executor.charge(model, self.executor.seconds(model, tokens, context),
                                       tokens=tokens, context=context)
        self._observe_pass(model, tokens, seconds)  # the real feedback: pass_costs + policy

    def calibrate(self, repeats: int = 2) -> float:
        """The real start-up calibration's observations, at the profile's costs (no virtual time
        passes: the server calibrates before it serves)."""
        target_sizes, draft_sizes = self.policy.calibration_sizes()
        budget = self.allocator.num_free
        for _ in range(repeats):
            for model, sizes in (("target", target_sizes), ("draft", draft_sizes)):
                for n in sizes:
                    if n <= budget:
                        # One sequence of n tokens (target) or n one-token requests (draft):
                        # either way the attention reads n KV slots.
                        seconds = self.executor.seconds(model, n, n) * self.executor.noise()
                        self._observe_pass(model, n, seconds)
        return 0.0

    # -- one step ------------------------------------------------------------------------------
    def _run_step(self, chunks, decodes, lengths, catch_up):
        k_of = {id(r): k for r, k in zip(decodes, lengths)}
        try:
            self._simulate_drafts(decodes, lengths, catch_up)
        except DraftPreempted:
            self._abandon_drafts(decodes, lengths)
            return None
        sampled = [c.req for c in chunks if c.needs_logits]
        outcomes = {id(r): self.acceptance_of(r).accepted(len(r.output_ids), k_of.get(id(r), 0))
                    for r in sampled}
        verifications = self._verify(chunks, k_of, outcomes)
        out: dict[Request, list[int]] = {}
        for req in sampled:
            k = k_of.get(id(req), 0)
            v = verifications.get(id(req))
            verified, bonus = (v.verified, v.bonus) if v is not None else (k, True)
            accepted = min(outcomes[id(req)], verified)
            n_emitted = accepted + 1 if accepted < verified or bonus else verified
            emitted = [DUMMY_TOKEN] * n_emitted
            # The real feedback, commit, roll-back and counting (SpeculativeGenerator._settle).
            out[req] = emitted[:self._settle(req, k, v, verified, accepted, bonus, emitted)]
        return out

    def _target_depth(self) -> int:
        """No target model here: the recorded target's depth, as the simulated early exit has it."""
        return self.early_exit.num_layers

    def _simulate_drafts(self, decodes, lengths, catch_up, goals: dict[int, int] | None = None) -> None:
        """The draft passes of SpeculativeGenerator._run_draft, priced instead of run; ``goals``:
        drafts to make now by id (default: every slot held; a pipeline makes its first frontier)."""
        k_of = {id(r): k for r, k in zip(decodes, lengths)}
        goal = goals or k_of
        step_reqs = [r for r, k in zip(decodes, lengths) if k > 0]
        behind = [r for r in decodes if id(r) in catch_up]
        if not step_reqs and not behind:
            return
        self._yield_point()  # before any draft_cached moves
        tokens = context = 0  # context: the draft KV each request's attention reads (cached + fed)
        for req in step_reqs:
            committed = len(req.kv_slots) - k_of[id(req)]
            tokens += committed - req.draft_cached
            req.draft_cached = committed
            context += committed
        for req in behind:
            tokens += catch_up[id(req)]
            req.draft_cached += catch_up[id(req)]
            context += req.draft_cached
        self._pass("draft", tokens, context)  # pass 0: catch-up rows; each drafting request gets d_1
        made = {id(r): 1 for r in step_reqs}
        live = [r for r in step_reqs if made[id(r)] < goal[id(r)]]
        while live:
            self._yield_point()
            for r in live:
                r.draft_cached += 1  # the pass reads the draft KV up to and including its feed
                made[id(r)] += 1
            self._pass("draft", len(live), sum(r.draft_cached for r in live))
            live = [r for r in live if made[id(r)] < goal[id(r)]]

    def _verify(self, chunks, k_of, outcomes) -> dict[int, Verification]:
        """The target pass: every chunk's tokens plus every draft; with early exit, its prunes.
        Its context: every request's KV slots (cached tokens, the chunk, the drafts)."""
        tokens = sum(len(c.tokens) + k_of.get(id(c.req), 0) for c in chunks)
        context = sum(len(c.req.kv_slots) for c in chunks)
        verifications: dict[int, Verification] = {}
        if self._scoring:
            for i, c in enumerate(chunks):
                k = k_of.get(id(c.req), 0)
                if k:
                    verifications[id(c.req)] = Verification(i, k, None, accept_rate=self._accept_rate(c.req))
        if not verifications:
            self._pass("target", tokens, context)
            return verifications
        spt = self._seconds_per_token([c.req for c in chunks if c.needs_logits], k_of, tokens)
        by_index = {v.index: outcomes[id(chunks[v.index].req)] for v in verifications.values()}
        # A segment with n rows left: the rows pruned are each one token of feed and of context.
        seconds = self.early_exit.run(tokens, list(verifications.values()), by_index, spt,
                                      lambda n: self.executor.seconds("target", n, context - (tokens - n)))
        self._observe_pass("target", tokens, self.executor.charge("target", seconds, tokens=tokens,
                                                                  context=context))
        pruned = sum(v.num_drafts - v.verified for v in verifications.values())
        self.num_pruned_rows += pruned
        if pruned and self.on_early_exit is not None:
            self.on_early_exit(pruned)
        return verifications
