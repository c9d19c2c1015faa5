"""Room kept for the tokens running requests will still decode (SGLang's new_token_ratio).

Admitting a request because its prompt fits today's free slots ignores that every running
request will grow by up to its ``max_new_tokens``: under a burst the pool fills with prompts,
the requests grow into each other, and the newest ones are retracted and recomputed (the
30-minute soak in docs/reliability.md: 196 retractions for 238 requests).  SGLang's scheduler instead
keeps back, for each running request, its remaining ``max_new_tokens`` (clipped at 4096, or at SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION as in SGLang)
scaled by a ratio, the share of that budget it expects requests to really use:

- the ratio starts at 0.7 x ``--schedule-conservativeness`` (at most 1) and decays linearly to
  0.14 of that over 600 decode steps in which nothing was retracted (most requests stop well
  before their limit, and the server learns that while it runs);
- a retraction resets it to what the running requests have shown: their decoded tokens plus
  20 more per request, over the sum of their ``max_new_tokens`` (at most 1);
- a request that ignores EOS will use its whole budget, so it reserves it in full;
- a new request must fit with its whole prompt and whole (clipped) ``max_new_tokens``.

Those rules and constants are SGLang 0.5.23's (``NewTokenRatioTracker``, ``PrefillAdder``),
written from their description, not their code.  On a speculative server every decode also
takes up to K draft slots a step; the planner keeps that headroom on top (``extra_slots``).
"""

from __future__ import annotations

import os

from faser_sgl.managers.request import Request


class DecodeReservation:
    INIT_RATIO = 0.7
    MIN_RATIO_FACTOR = 0.14
    DECAY_STEPS = 600
    CLIP_MAX_NEW_TOKENS = 4096
    RETRACT_DECODE_STEPS = 20

    def __init__(self, conservativeness: float = 1.0):
        if not conservativeness >= 0:
            raise ValueError(f"--schedule-conservativeness must be >= 0, got {conservativeness}")
        self.init_ratio = min(self.INIT_RATIO * conservativeness, 1.0)
        self.min_ratio = min(self.init_ratio * self.MIN_RATIO_FACTOR, 1.0)
        self.decay = (self.init_ratio - self.min_ratio) / self.DECAY_STEPS
        self.ratio = self.init_ratio
        # SGLang reads the clip from this variable too (its tests lower it to fit small pools).
        self.clip = int(os.environ.get("SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION", self.CLIP_MAX_NEW_TOKENS))

    @staticmethod
    def ignores_eos(req: Request) -> bool:
        return not req.stop.stop_token_ids

    def future_tokens(self, req: Request) -> float:
        """Slots kept back for a running request's remaining output."""
        left = min(max(req.stop.max_new_tokens - len(req.output_ids), 0), self.clip)
        return left * (1.0 if self.ignores_eos(req) else self.ratio)

    def new_request_tokens(self, req: Request) -> int:
        """What a waiting request must find room for to be admitted: its uncached tokens and its
        whole clipped output budget (what is left of it, for a retracted request)."""
        left = max(req.stop.max_new_tokens - len(req.output_ids), 0)
        return req.num_uncached + min(left, self.clip)

    def decoded_without_retraction(self) -> None:
        self.ratio = max(self.ratio - self.decay, self.min_ratio)

    def retracted(self, running: list[Request]) -> None:
        decoded = sum(len(r.output_ids) for r in running)
        budget = sum(r.stop.max_new_tokens for r in running)
        self.ratio = min(1.0, (decoded + self.RETRACT_DECODE_STEPS * len(running)) / (budget + 1))


def test_retract_interval() -> int:
    """SGLang's test switch, read from the same variables: with SGLANG_TEST_RETRACT set, a
    retraction every SGLANG_TEST_RETRACT_INTERVAL (default 3) steps (BatchPlanner); else 0."""
    if os.environ.get("SGLANG_TEST_RETRACT", "").strip().lower() not in ("1", "true", "yes", "on"):
        return 0
    return max(1, int(os.environ.get("SGLANG_TEST_RETRACT_INTERVAL", "3")))
