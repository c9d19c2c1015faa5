"""How much a request's acceptance estimate should lean on the population's rate.

The adaptive drafter starts each request from the population's acceptance rate, worth some
pseudo-trials, and lets the request's own verifications move it (adaptive.AdaptiveLength,
"feedback").  How many pseudo-trials is a property of the workload, not a constant: where
requests accept about the same share of drafts (code completion with one draft model: a
between-request standard deviation of ~0.05 around 0.91 on 2026-12-07's load run), one rejected
draft says little about the request and the population should dominate; where requests differ
(a mix of prompts the draft model knows and ones it does not), each request's own evidence should.

Empirical Bayes with a beta prior: if a request's rate has mean p and variance v across requests,
the prior is worth n0 = p (1 - p) / v - 1 trials.  v is estimated online from pairs of trials of
the same request in different verifications: the product of their deviations from the
population's rate has expectation v (trials of different requests share no rate, so they are
not paired).  The sums decay like the population's own counts, and pseudo-pairs at the old
fixed weight (MIN_TRIALS) stand in while a young server has few pairs.

Measured (scripts/replay_acceptance_estimate.py on the 2026-12-07 acceptance files of fixed
K = 4 and K = 2, which drafted regardless of any estimate): log-loss of a request's estimate on
the drafts its next verification tested, K = 4 / K = 2: 0.325 / 0.355 with the old fixed 2
pseudo-trials, 0.293 / 0.318 with this estimate (a new request's weight: median 31 / 40), 0.294 /
0.317 for the population's rate alone.
"""

from __future__ import annotations

import math

from faser_sgl.managers.request import Request


def _bernoulli_divergence(observed: float, expected: float) -> float:
    """KL(Bernoulli(observed) || Bernoulli(expected)), in nats."""
    def term(a: float, b: float) -> float:
        return 0.0 if a <= 0.0 else a * math.log(a / max(b, 1e-12))
    return term(observed, expected) + term(1.0 - observed, 1.0 - expected)


class PriorStrength:
    """The beta model has thin tails: with the population's spread at ~0.05 a request that
    accepts nothing cannot exist, yet one does when its prompt is something the draft model
    cannot follow.  So a request whose own trials are too unlikely under the population's rate
    (``stands_out``: probability below 1/1000 by the Chernoff bound, e.g. 3 rejected trials in a
    row at 0.91, or 5 of 10 accepted) keeps only MIN_TRIALS of its prior."""
    MIN_TRIALS = 2.0
    MAX_TRIALS = 40.0
    PRIOR_PAIRS = 50.0
    DECAY = 0.99
    SURPRISE_NATS = math.log(1000.0)

    def __init__(self):
        self._covariance = 0.0  # decayed sum of paired deviation products
        self._pairs = 0.0  # decayed number of pairs

    def observe(self, req: Request, accepted: float, tested: float, population_rate: float) -> None:
        """One verification of ``req``: ``tested`` drafts, ``accepted`` of them accepted."""
        deviation = accepted - population_rate * tested
        earlier_deviation, earlier_trials = req.spec_accept_deviation or (0.0, 0.0)
        self._covariance = self._covariance * self.DECAY + deviation * earlier_deviation
        self._pairs = self._pairs * self.DECAY + tested * earlier_trials
        req.spec_accept_deviation = (earlier_deviation + deviation, earlier_trials + tested)

    def between_request_variance(self, population_rate: float) -> float:
        binomial = population_rate * (1.0 - population_rate)
        stand_in = binomial / (self.MIN_TRIALS + 1.0)
        return (self._covariance + stand_in * self.PRIOR_PAIRS) / (self._pairs + self.PRIOR_PAIRS)

    def trials(self, population_rate: float) -> float:
        """Pseudo-trials the population's rate is worth as a new request's prior."""
        binomial = population_rate * (1.0 - population_rate)
        variance = self.between_request_variance(population_rate)
        if variance * (self.MAX_TRIALS + 1.0) <= binomial:
            return self.MAX_TRIALS
        return min(self.MAX_TRIALS, max(self.MIN_TRIALS, binomial / variance - 1.0))

    def stands_out(self, req: Request, population_rate: float) -> bool:
        """Whether the request's trials so far are too unlikely under the population's rate."""
        deviation, trials = req.spec_accept_deviation or (0.0, 0.0)
        if trials <= 0.0:
            return False
        own_rate = min(1.0, max(0.0, population_rate + deviation / trials))
        return trials * _bernoulli_divergence(own_rate, population_rate) > self.SURPRISE_NATS
