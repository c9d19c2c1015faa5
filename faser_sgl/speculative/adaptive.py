"""Adaptive per-request draft lengths (the first FASER mechanism).

Each step the policy picks k_i for every decoding request so as to maximise the step's expected
goodput: expected emitted tokens divided by the step's predicted time.

- Expected tokens.  Request i's drafts are accepted one by one with probability a_i each (the
  usual i.i.d. model), so verifying k drafts emits E(k) = 1 + a + ... + a^k tokens (the last
  from the target).  a_i is estimated from that request's own verifications, with a decaying
  memory (acceptance drifts within a generation) and a prior for requests with few samples.
- Step time.  One target pass over all the step's tokens plus one draft pass per draft
  position, each priced by a cost curve measured from the executor's forward passes
  (``CostCurve``): first a calibration before serving (``calibration_sizes``), then every pass
  the server runs.  The load enters here: the target pass already carries every decode's own
  token and any prefill chunks, so a draft token is priced at the margin of a big pass under
  load and of a small one when the server is quiet.
- Choice.  The planner starts from the best uniform length for the step, then moves each
  request's length up or down by one token while that raises goodput.  On hardware
  where verifying more rows is nearly free (a GPU at small batch) this drafts long; where each
  extra row costs nearly a full row (a CPU without matrix units) it drafts little or nothing.

A request the draft model lags behind (after its prefill, or after steps without drafting) is
also charged its share of the catch-up: the draft pass that feeds its unseen tokens, spread over
the tokens it may still emit.

``--speculative-cost-profile`` pins both curves to given lines instead (no calibration, no
learning from measured passes), e.g. to see what the drafter would choose on another machine.

A request whose estimate says "do not draft" is not observed any more, so its estimate slowly
returns towards the prior while it waits; it is probed again when that makes drafting pay, and the
probe decides.  The prior itself fades as evidence comes in, so a request that accepts nothing
stops drafting wherever drafting costs something, apart from those probes (``AdaptiveLength``,
"feedback").
"""

from __future__ import annotations

import bisect
import math

from faser_sgl.managers.request import Request
from faser_sgl.speculative.prior_strength import PriorStrength


class CostCurve:
    """Measured seconds of a forward pass against its token count.

    A single line does not fit: on a CPU one decode row costs far more per token than a
    300-token prefill chunk, and on a GPU small passes cost the same whatever their size.  So the
    curve keeps a moving average per size bucket (exact sizes up to 8 tokens, then four buckets
    per doubling) and interpolates linearly between observed buckets; the marginal cost of one
    more token is then read where the step actually is.  Buckets keep their last estimate when
    the load moves away, so a cost once measured is remembered.  Before any measurement the
    prior ``fixed_s + per_token_s * tokens`` answers."""

    SMOOTHING = 0.25  # weight of a new measurement in its bucket's average

    def __init__(self, fixed_s: float, per_token_s: float):
        self.prior = (fixed_s, per_token_s)
        self._buckets: dict[int, list[float]] = {}  # bucket -> [mean tokens, mean seconds]
        self._sorted: list[list[float]] | None = None  # by tokens, rebuilt after observe()
        self._keys: list[float] = []  # token counts of self._sorted, for bisect
        self._cheapest: list[float] = []  # least seconds at or above each sorted point (predict)

    @staticmethod
    def _bucket(tokens: int) -> int:
        return tokens if tokens <= 8 else round(4 * math.log2(tokens))

    def observe(self, tokens: int, seconds: float) -> None:
        point = self._buckets.get(self._bucket(tokens))
        if point is None:
            self._buckets[self._bucket(tokens)] = [float(tokens), seconds]
        else:
            point[0] += self.SMOOTHING * (tokens - point[0])
            point[1] += self.SMOOTHING * (seconds - point[1])
        self._sorted = None

    @property
    def measured(self) -> bool:
        return bool(self._buckets)

    def predict(self, tokens: float) -> float:
        if self._sorted is None:
            self._sorted = sorted(self._buckets.values())
            self._keys = [p[0] for p in self._sorted]
            # cheapest[i]: the least seconds measured at or above point i's size.  A pass never
            # costs more than a bigger one (it could be padded to that size), so an estimate
            # above that is a bucket measured in a moment of noise (a co-runner on one of two
            # cores makes a pass several times slower) that nothing has measured since: after a
            # noisy start-up calibration the 4-token bucket stayed at 1.7 s beside 0.24 s for 16
            # tokens, and a verification never carries just 4 tokens to correct it.
            self._cheapest = [p[1] for p in self._sorted]
            for i in range(len(self._cheapest) - 2, -1, -1):
                self._cheapest[i] = min(self._cheapest[i], self._cheapest[i + 1])
        points = self._sorted
        if not points:
            return self.prior[0] + self.prior[1] * tokens
        if len(points) == 1:
            (n0, s0), = points
            estimate = s0 + self.prior[1] * (tokens - n0)
            return max(0.0, estimate if tokens >= n0 else max(estimate, s0 * tokens / n0))
        above = bisect.bisect_left(self._keys, tokens)
        if above < len(points):
            return min(self._interpolate(tokens), self._cheapest[above])
        return self._interpolate(tokens)

    def _interpolate(self, tokens: float) -> float:
        points = self._sorted
        i = bisect.bisect_left(self._keys, tokens)
        i = min(max(i, 1), len(points) - 1)  # interpolate inside, extrapolate the end segments
        (n0, s0), (n1, s1) = points[i - 1], points[i]
        slope = max(0.0, (s1 - s0) / (n1 - n0)) if n1 > n0 else 0.0
        estimate = s0 + slope * (tokens - n0)
        if tokens < n0:
            # Below the smallest size measured, a steep first segment (or the prior's slope from
            # one prefill-sized point) extrapolated to zero or less: a pass costs at least its
            # share of the smallest measured pass, as if its cost were all per token.
            estimate = max(estimate, s0 * tokens / n0)
        return max(0.0, estimate)


class StepOverhead:
    """Measured seconds a step costs outside its forward passes (planning, sampling and
    accepting over the vocabulary, stop checks, output messages).  A step without drafts samples
    one row per request; a drafting step samples and accepts every verified row (and the draft's
    rows), which on the CPU costs ~1.1-1.3 ms per verified row against ~0.3 ms per plain row
    (docs/benchmarks.md): 35-45 ms of a 0.4-0.6 s step at 10-16 decodes.  Keyed by requests
    alone, that overhead was predicted from mostly plain steps and drafting under load looked
    cheaper than it was.  So two curves: plain steps by requests, drafting steps by the rows
    they verify.  Unmeasured, a step has no overhead."""

    def __init__(self):
        self._curves = {False: CostCurve(0.0, 0.0), True: CostCurve(0.0, 0.0)}

    def observe(self, drafted: bool, size: float, seconds: float) -> None:
        self._curves[bool(drafted)].observe(max(1, size), max(0.0, seconds))

    def predict(self, drafted: bool, size: float) -> float:
        curve = self._curves[bool(drafted)]
        return curve.predict(max(1.0, size)) if curve.measured else 0.0


COST_PROFILE_SYNTAX = "target=FIXED_MS+PER_TOKEN_MS,draft=FIXED_MS+PER_TOKEN_MS"


def parse_cost_profile(text: str) -> dict[str, tuple[float, float]]:
    """``--speculative-cost-profile``: fixed cost of a pass plus cost per token it carries, in
    milliseconds, for both models, e.g. ``"target=30+0.01,draft=2+0.01"`` (GPU-like).  Returns
    ``{"target": (fixed_s, per_token_s), "draft": (fixed_s, per_token_s)}`` in seconds; raises
    ValueError with the reason on anything else."""
    example = f"expected {COST_PROFILE_SYNTAX!r} in milliseconds, e.g. 'target=30+0.01,draft=2+0.01'"
    costs: dict[str, tuple[float, float]] = {}
    for part in text.split(","):
        model, eq, curve = (s.strip() for s in part.partition("="))
        if not eq or model not in ("target", "draft"):
            raise ValueError(f"{part.strip()!r} does not name target or draft; {example}")
        if model in costs:
            raise ValueError(f"{model} is given twice; {example}")
        fixed, plus, per_token = curve.partition("+")
        try:
            if not plus:
                raise ValueError
            values = (float(fixed), float(per_token))
        except ValueError:
            raise ValueError(f"{model} cost {curve!r} is not FIXED_MS+PER_TOKEN_MS; {example}") from None
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"{model} costs must be finite and non-negative, got {curve!r}")
        if model == "target" and values == (0.0, 0.0):
            raise ValueError("a target pass cannot be free (target=0+0)")
        costs[model] = (values[0] / 1000, values[1] / 1000)
    missing = [m for m in ("target", "draft") if m not in costs]
    if missing:
        raise ValueError(f"no cost for {' and '.join(missing)}; {example}")
    return costs


def expected_tokens(accept_rate: float, k: int) -> float:
    """1 + a + a^2 + ... + a^k: tokens one verification of k drafts emits on average."""
    return sum(accept_rate ** j for j in range(k + 1))


class AdaptiveLength:
    name = "adaptive"

    # Acceptance estimate (see "feedback" below): prior mean and the pseudo-trials a new request
    # starts with (PriorStrength's estimate, at least 2), decay of all counts per verification,
    # and per step while the request does not draft the decay towards a faint prior of
    # IDLE_PRIOR_TRIALS pseudo-trials.
    PRIOR_RATE = 0.7
    DECAY = 0.9
    IDLE_DECAY = 0.9
    IDLE_PRIOR_TRIALS = 0.05
    # The population's counts (a new request's prior): decay per verification of any request
    # (the last few hundred count), decay per step in which nobody drafts, and the pseudo-trials
    # at PRIOR_RATE they start from and never lose.
    POOL_DECAY = 0.99
    POOL_IDLE_DECAY = 0.95
    POOL_PRIOR_TRIALS = 10.0
    # A new request opens this many standard errors above the population's rate (opening_rate).
    OPENING_OPTIMISM = 1.0

    def __init__(self, max_draft_tokens: int, cost_profile: dict[str, tuple[float, float]] | None = None):
        """``cost_profile`` (see ``parse_cost_profile``) pins both cost curves to those lines:
        no calibration, and measured passes do not move them."""
        if max_draft_tokens < 1:
            raise ValueError(f"--speculative-num-draft-tokens must be at least 1, got {max_draft_tokens}")
        self.max_k = max_draft_tokens
        self.pinned = cost_profile is not None
        # Priors in seconds; unless pinned, the first measured passes replace them.
        target, draft = (cost_profile["target"], cost_profile["draft"]) if self.pinned else \
            ((0.02, 0.002), (0.01, 0.001))
        self.target_cost = CostCurve(*target)
        self.draft_cost = CostCurve(*draft)
        # Early exit (faser): the mean share of a draft row's target cost that pruning saved, by
        # the row's draft position 1..max_k.  A row that is often pruned early costs less to
        # verify, so the plan prices it lower (all zero without early exit).
        self.row_saving = [0.0] * (self.max_k + 2)
        # ... and the tokens it loses: per position s, the decayed mass of verifications in which
        # the row of d_s would have given a token (d_1..d_s accepted, imputed past a prune) and
        # the part of it that a prune dropped.  The plan counts a^s * row_yield(s) for that row.
        # Both start as one reached verification with nothing lost, so that the first wrong
        # prune moves the yield by PRUNE_SMOOTHING instead of setting it to zero.
        self._row_reached = [1.0] * (self.max_k + 2)
        self._row_lost = [0.0] * (self.max_k + 2)
        self.overhead = StepOverhead()  # seconds outside the passes (observe_step_overhead)
        # Decayed (successes, trials) over every request's verifications: a new request's prior,
        # and how many pseudo-trials that prior is worth.
        self._pool = (0.0, 0.0)
        self.prior_strength = PriorStrength()

    # -- feedback ------------------------------------------------------------------------------
    # The estimate is successes / trials over the request's decayed counts.  A new request starts
    # with the prior as prior_trials() pseudo-trials at opening_rate(), and each verification
    # multiplies all counts, the prior's included, by DECAY before adding its own.
    # - The prior's weight is estimated from how much requests differ (prior_strength.py): 2
    #   pseudo-trials, as it was fixed before, made one rejected draft (which a workload at 0.91
    #   gives every ~10 drafts) drop a request's estimate to ~0.6 and its drafts to one token
    #   for the next ~10 steps, although the next drafts of such a request were accepted at 0.87
    #   (2026-12-07 load run: `adaptive` verified 3.2 tokens a pass at 0.25 req/s against
    #   `batch-ema`'s 4.0).
    # - The prior ages like evidence.  With a prior of fixed weight the decayed evidence (at
    #   most tested / (1 - DECAY) trials) never outweighed it: zero acceptance read as
    #   0.7 * 2 / (2 + 5) = 0.2 (DECAY 0.8), which still pays for a draft where verification is
    #   nearly free, so with GPU-like costs the policy never stopped drafting (docs/simulation.md,
    #   "Found with the simulator").  Now the estimate tends to the request's own recent rate,
    #   and to 0 when nothing is accepted.
    # - DECAY 0.9 (was 0.8): with no prior to lean on, the estimate is the last ~10
    #   verifications; over ~5, a run of rejections at a moderate rate (5 in a row at 0.3:
    #   p = 0.17) read as "nothing accepted" and stopped drafting for a whole probe interval
    #   (simulated TPOT 5-6% worse at acceptance 0.3 with GPU-like costs).
    # - While the request does not draft (choose_lengths) nothing is observed, so each step its
    #   counts fade by IDLE_DECAY towards a faint prior (IDLE_PRIOR_TRIALS at PRIOR_RATE): the
    #   estimate climbs back from what the request last saw, the request is probed again when
    #   drafting pays, and the probe decides (accepted: drafting resumes at once; rejected: the
    #   estimate drops back near 0).  Fading back to the full prior instead (as before) crossed a
    #   low threshold again within 1-2 steps: with zero acceptance and GPU-like costs it still
    #   drafted in ~60% of steps.  Towards a faint prior the climb is close to geometric, so the
    #   wait grows with the threshold only logarithmically: with zero acceptance a probe every ~12
    #   steps with GPU-like costs, every ~30 on the CPU profile (~9 before).
    # - A new request's prior is the population's recent rate (the server's decayed counts over
    #   every request's verifications, themselves starting from PRIOR_RATE), not a constant:
    #   most requests of a workload see about the same acceptance, and requests are short (a
    #   few to a few tens of verifications), so a prior far below the workload's rate spent a
    #   third of each request ramping up one draft token per step (the 2026-12-07 load run:
    #   acceptance ~0.9 on code, yet `adaptive` opened every request at k = 1 from 0.7 and
    #   averaged 2.8 tokens a pass against fixed K = 4's 4.05).  The population's evidence
    #   stands beside POOL_PRIOR_TRIALS at PRIOR_RATE, and it fades in every step in which
    #   nobody drafts: a low population rate stops new requests drafting, which would otherwise
    #   stop all new evidence for good (seen: the server's 8-token warm-up request, 1 of 4
    #   drafts accepted, set a prior of 0.4 at which no request of a load run ever drafted).
    #   The requests' own idle fade keeps the constant PRIOR_RATE for the same reason.
    # - A new request opens optimistic: at the population's rate plus OPENING_OPTIMISM standard
    #   errors of it (opening_rate), which is wide while the evidence is thin or faded and
    #   vanishes under a busy server's evidence.  Opening at the plain mean was a trap whenever
    #   it sat below what drafting needs at the current load: then nobody drafted, so no
    #   evidence came, and the fade only brought the mean back to PRIOR_RATE (0.7), where a
    #   request that must first catch the draft model up over its prompt does not pay at 4 or
    #   more decodes on a CPU.  Seen (2026-12-07, a fresh `faser` server at 1 req/s): the
    #   warm-up request's rejected draft and the first request's set the mean to 0.42-0.6, and
    #   not one of the next 180 steps drafted, on a workload that accepts ~0.9 per draft
    #   (docs/benchmarks.md section 10).  With the optimism a stale or thin population is
    #   probed at the first load where its upper estimate pays, and the probe's evidence
    #   decides; a population that really accepts little is probed when its faded evidence
    #   widens the bound again, at most every few tens of idle steps.
    def prior_rate(self) -> float:
        """The population's recent acceptance (its decayed counts beside the pseudo-trials)."""
        successes, trials = self._pool
        return (successes + self.PRIOR_RATE * self.POOL_PRIOR_TRIALS) / (trials + self.POOL_PRIOR_TRIALS)

    def opening_rate(self) -> float:
        """A new request's prior: the population's rate plus OPENING_OPTIMISM standard errors."""
        mean = self.prior_rate()
        weight = self._pool[1] + self.POOL_PRIOR_TRIALS
        return min(1.0, mean + self.OPENING_OPTIMISM * math.sqrt(mean * (1.0 - mean) / weight))

    def prior_trials(self) -> float:
        """Pseudo-trials a new request's prior is worth (at least PriorStrength.MIN_TRIALS)."""
        return self.prior_strength.trials(self.prior_rate())

    def _counts(self, req: Request) -> tuple[float, float]:
        """The request's decayed (successes, trials), its prior's remaining pseudo-counts
        included; a request never observed (req.spec_accept_stats None) holds the prior alone,
        fixed at its first observation."""
        if req.spec_accept_stats is None:
            rate, trials = self._prior_of(req)
            return rate * trials, trials
        return req.spec_accept_stats

    def _prior_of(self, req: Request) -> tuple[float, float]:
        """(rate, remaining pseudo-trials) of the request's prior."""
        if req.spec_accept_prior is None:
            return self.opening_rate(), self.prior_trials()
        return req.spec_accept_prior

    def _set_counts(self, req: Request, successes: float, trials: float, prior_decay: float = 1.0) -> None:
        rate, weight = self._prior_of(req)
        req.spec_accept_prior = (rate, weight * prior_decay)
        req.spec_accept_stats = (successes, trials)

    def _demote_prior(self, req: Request) -> None:
        """The request's own evidence is too unlike the population's for the population's prior
        to speak for it (PriorStrength.stands_out): keep at most MIN_TRIALS pseudo-trials of it,
        so that a request the draft model cannot follow stops drafting as fast as it did with a
        fixed weak prior, however alike the other requests are."""
        rate, weight = self._prior_of(req)
        keep = min(weight, PriorStrength.MIN_TRIALS)
        successes, trials = self._counts(req)
        req.spec_accept_stats = (successes - rate * (weight - keep), trials - (weight - keep))
        req.spec_accept_prior = (rate, keep)

    def _pool_observe(self, successes: float, trials: float, decay: float | None = None) -> None:
        decay = self.POOL_DECAY if decay is None else decay
        pooled_successes, pooled_trials = self._pool
        self._pool = (pooled_successes * decay + successes, pooled_trials * decay + trials)

    def accept_rate(self, req: Request) -> float:
        successes, trials = self._counts(req)
        # trials > 0: the prior's pseudo-trials fade but never vanish, except by float underflow
        # after thousands of verifications that tested no draft.
        return min(1.0, max(0.0, successes / trials)) if trials > 1e-12 else self.PRIOR_RATE

    def observe(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        successes, trials = self._counts(req)
        # Drafts are tested in order until the first rejection: num_accepted successes, then one
        # failure unless all were accepted.
        tested = num_accepted + (1 if num_accepted < num_drafted else 0)
        self._set_counts(req, successes * self.DECAY + num_accepted, trials * self.DECAY + tested,
                         self.DECAY)
        population_rate = self.prior_rate()
        self.prior_strength.observe(req, num_accepted, tested, population_rate)
        if self.prior_strength.stands_out(req, population_rate):
            self._demote_prior(req)
        self._pool_observe(num_accepted, tested)

    def observe_unseen(self, req: Request, reject_prob: float) -> None:
        """Early exit pruned the draft after a fully accepted run (``observe`` saw no failure
        there): count that draft as one more trial, accepted with the chance the exit
        calibration gives it.  Prunes are made where rejections are predicted, so dropping the
        trial (a censored observation) would skew the estimate upward."""
        successes, trials = self._counts(req)
        self._set_counts(req, successes + (1.0 - reject_prob), trials + 1.0)
        self._pool_observe(1.0 - reject_prob, 1.0)

    def _idle(self, req: Request) -> None:
        """One step without drafting: the counts fade towards the faint prior."""
        successes, trials = self._counts(req)
        fill = (1.0 - self.IDLE_DECAY) * self.IDLE_PRIOR_TRIALS
        self._set_counts(req, successes * self.IDLE_DECAY + self.PRIOR_RATE * fill,
                         trials * self.IDLE_DECAY + fill, self.IDLE_DECAY)

    PRUNE_SMOOTHING = 0.05

    def observe_pruning(self, num_drafts: int, pruned_from: int | None, layers_skipped: float,
                        accepted: int | None = None, accept_rate: float | None = None) -> None:
        """One verification under early exit: rows of drafts pruned_from..num_drafts skipped
        ``layers_skipped`` (a share of the depth); None: nothing was pruned.  ``accepted``: drafts
        accepted (of the verified ones), ``accept_rate``: the request's estimate, which imputes
        whether the drafts a prune hid would have been accepted."""
        verified = num_drafts if pruned_from is None else pruned_from
        for s in range(1, min(num_drafts, self.max_k) + 1):
            pruned = pruned_from is not None and s >= pruned_from
            saved = layers_skipped if pruned else 0.0
            self.row_saving[s] += self.PRUNE_SMOOTHING * (saved - self.row_saving[s])
            if accepted is None:
                continue
            # Would the row of d_s have given a token?  Known up to the verified drafts;
            # beyond them only when all verified ones were accepted, then a^(s - verified).
            if s <= verified:
                reached = 1.0 if accepted >= s else 0.0
            else:
                reached = (accept_rate or 0.0) ** (s - verified) if accepted >= verified else 0.0
            lost = reached if pruned else 0.0
            self._row_reached[s] += self.PRUNE_SMOOTHING * (reached - self._row_reached[s])
            self._row_lost[s] += self.PRUNE_SMOOTHING * (lost - self._row_lost[s])

    def row_yield(self, position: int) -> float:
        """The share of the token from the row of the draft at ``position`` that early exit lets
        through: 1 without pruning, less where prunes drop rows that would have given tokens."""
        reached = self._row_reached[position]
        return 1.0 - self._row_lost[position] / reached if reached > 1e-12 else 1.0

    def row_cost(self, position: int) -> float:
        """Target rows a draft token at this position costs, net of early exit's savings."""
        return 1.0 - self.row_saving[position]

    def observe_forward(self, model: str, num_tokens: int, seconds: float) -> None:
        if self.pinned:
            return
        (self.target_cost if model == "target" else self.draft_cost).observe(num_tokens, seconds)

    def calibration_sizes(self) -> tuple[list[int], list[int]]:
        if self.pinned:
            return [], []
        # Every verification size of a lone request (1..K+1 tokens): on a CPU the cost jumps
        # between neighbouring small sizes (2 rows can cost what 1 does, 4 rows twice that), which
        # no interpolation guesses; then batch sizes a few steps apart for the load.
        target = sorted(set(range(1, self.max_k + 2)) | {8, 16, 32, 64})
        draft = [1, 2, 4, 8, 16, 32]
        return target, draft

    def catch_up_per_token(self, req: Request) -> float:
        """Seconds per emitted token that drafting costs ``req`` beyond its share of the draft
        passes: the draft model has not seen ``lag`` of its tokens (its whole prompt, just after
        prefill), and its first drafting step feeds them all.  That is paid once and serves every
        later drafting step, so it is spread over the tokens the request may still emit; a
        request that lags far and has little left to generate (or a gain too thin to repay it)
        is not started."""
        lag = len(req.kv_slots) - req.draft_cached
        if lag <= 1:
            return 0.0
        extra = self.draft_cost.predict(lag) - self.draft_cost.predict(1)
        remaining = max(1, req.stop.max_new_tokens - len(req.output_ids))
        return max(0.0, extra) / remaining

    def predict_step(self, reqs: list[Request], lengths: list[int], step_tokens: int = 0,
                     pass0_tokens: int | None = None) -> float:
        """Predicted seconds of a step that drafts ``lengths`` for ``reqs`` beside ``step_tokens``
        target tokens, priced as the passes it runs (so that the step records show where this
        view of a step and the measured one differ): the target pass, draft pass 0 over
        everything it feeds (``pass0_tokens``: each drafting request's unseen tokens plus the
        chunks fed to requests that only catch up; None: computed from the requests as they are
        before their draft slots are added), one draft pass per further position, and the
        step's measured overhead outside the passes.  The choice weighs the same passes, except
        that it spreads a catch-up over the request's coming tokens (``catch_up_per_token``):
        it is paid once and serves every later drafting step."""
        plan = self._plan(reqs, step_tokens)
        plan.reset(lengths)
        feed = pass0_tokens if pass0_tokens is not None else \
            sum(max(1, len(r.kv_slots) - r.draft_cached) for r, k in zip(reqs, lengths) if k > 0)
        rows = list(plan.rows)
        if rows:
            rows[0] = 0  # pass 0 is priced by what it feeds
        seconds = plan._seconds(plan.target_tokens, rows, 0.0, drafting=any(lengths))
        if feed:
            seconds += self.draft_cost.predict(feed)
        return seconds  # the plan's overhead included

    # -- per-step overhead (StepOverhead says why two curves) ------------------------------------
    def observe_step_overhead(self, drafted: bool, size: int, seconds: float) -> None:
        self.overhead.observe(drafted, size, seconds)

    def step_overhead(self, drafted: bool, size: float) -> float:
        return self.overhead.predict(drafted, size)

    def _plan(self, reqs: list[Request], step_tokens: int) -> "_StepPlan":
        return _StepPlan(self, [self.accept_rate(r) for r in reqs], max(step_tokens, len(reqs)),
                         [self.catch_up_per_token(r) for r in reqs])

    # -- choice --------------------------------------------------------------------------------
    def choose_lengths(self, reqs: list[Request], step_tokens: int = 0) -> list[int]:
        """``step_tokens``: tokens the target pass carries without any draft (each decode's own
        token plus prefill chunks), i.e. the load this step's drafts are added to."""
        if not reqs:
            return []
        caps = [min(self.max_k, r.requested_draft_len) if r.requested_draft_len is not None else self.max_k
                for r in reqs]
        plan = self._plan(reqs, step_tokens)
        # Start from the best uniform length: a draft pass has a fixed cost that one request's
        # gain rarely pays alone, so growing lengths one token at a time from zero would stop
        # short of a length that pays once every request drafts.
        uniform = max(range(self.max_k + 1), key=lambda k: plan.goodput_of([min(k, c) for c in caps]))
        plan.reset([min(uniform, c) for c in caps])
        # Then per request: add a draft token where it pays, remove one where it does not.
        for _ in range(2 * self.max_k + 2):
            changed = False
            for i in range(len(reqs)):
                for step in (+1, -1):
                    if 0 <= plan.lengths[i] + step <= caps[i] and plan.gain_of(i, step) > 0:
                        plan.apply(i, step)
                        changed = True
            if not changed:
                break
        for req, k in zip(reqs, plan.lengths):
            if k == 0:
                self._idle(req)
        if not any(plan.lengths):
            self._pool_observe(0.0, 0.0, self.POOL_IDLE_DECAY)
        return plan.lengths


class _StepPlan:
    """Draft lengths of one step with their expected tokens and predicted time, updated one
    token at a time so that trying a change costs O(max_k), not O(batch)."""

    def __init__(self, policy: AdaptiveLength, rates: list[float], step_tokens: int,
                 catch_up: list[float]):
        self.policy = policy
        self.rates = rates
        self.step_tokens = step_tokens
        self.catch_up = catch_up  # seconds per emitted token, charged while k > 0
        self.reset([0] * len(rates))

    def _catch_up_of(self, i: int, k: int) -> float:
        return self.catch_up[i] * expected_tokens(self.rates[i], k) if k else 0.0

    def _row_tokens(self, i: int, s: int) -> float:
        """Expected token from the row of request i's draft at position s: d_1..d_s accepted,
        and the row not pruned by early exit."""
        return self.rates[i] ** s * self.policy.row_yield(s)

    def reset(self, lengths: list[int]) -> None:
        self.lengths = list(lengths)
        self.tokens = sum(1.0 + sum(self._row_tokens(i, s) for s in range(1, k + 1)) for i, k in enumerate(lengths))
        cost = self.policy.row_cost
        self.target_tokens = self.step_tokens + sum(cost(s) for k in lengths for s in range(1, k + 1))
        # rows[s]: requests taking part in draft pass s (those with k > s).
        self.rows = [sum(k > s for k in lengths) for s in range(self.policy.max_k)]
        self.extra_s = sum(self._catch_up_of(i, k) for i, k in enumerate(lengths))
        self.goodput = self._goodput(self.tokens, self.target_tokens, self.rows, self.extra_s)

    @property
    def seconds(self) -> float:
        """Predicted seconds of the step with the current lengths."""
        return self._seconds(self.target_tokens, self.rows, self.extra_s)

    def _seconds(self, target_tokens: float, rows: list[int], extra_s: float,
                 drafting: bool | None = None) -> float:
        """Passes plus the measured overhead outside them: by the requests for a step without
        drafts, by the rows verified for a drafting one (rows[0]: requests that draft)."""
        drafting = bool(rows and rows[0]) if drafting is None else drafting
        overhead = self.policy.step_overhead(drafting, target_tokens if drafting else len(self.rates))
        seconds = self.policy.target_cost.predict(target_tokens) + extra_s + overhead
        return seconds + sum(self.policy.draft_cost.predict(n) for n in rows if n)

    def _goodput(self, tokens: float, target_tokens: float, rows: list[int], extra_s: float) -> float:
        return tokens / max(self._seconds(target_tokens, rows, extra_s), 1e-9)

    def goodput_of(self, lengths: list[int]) -> float:
        self.reset(lengths)
        return self.goodput

    def _changed(self, i: int, step: int) -> tuple[float, float, list[int], float]:
        k = self.lengths[i]
        rows = list(self.rows)
        extra_s = self.extra_s - self._catch_up_of(i, k) + self._catch_up_of(i, k + step)
        cost = self.policy.row_cost
        if step > 0:
            rows[k] += 1
            return self.tokens + self._row_tokens(i, k + 1), self.target_tokens + cost(k + 1), rows, extra_s
        rows[k - 1] -= 1
        return self.tokens - self._row_tokens(i, k), self.target_tokens - cost(k), rows, extra_s

    def gain_of(self, i: int, step: int) -> float:
        """How much goodput changing request i's length by ``step`` adds (relative)."""
        return self._goodput(*self._changed(i, step)) / self.goodput - 1.0 - 1e-9

    def apply(self, i: int, step: int) -> None:
        self.tokens, self.target_tokens, self.rows, self.extra_s = self._changed(i, step)
        self.lengths[i] += step
        self.goodput = self._goodput(self.tokens, self.target_tokens, self.rows, self.extra_s)
