"""FASER's frontier pipeline in the simulator: the real controller and bookkeeping, priced passes.

``SimulatedFrontierGenerator`` is the server's ``FrontierGenerator`` (speculative/frontier.py)
with its passes replaced the way ``SimulatedGenerator`` replaces the serial step's.  What stays
real code:
- ``FrontierController``: per step, serial or pipelined, which split, the frontier size, and (for
  adaptive policies, with ``auto``) uniform lengths it may prefer to the policy's, all from the
  pass costs it has observed: the whole machine's (``pass_costs``, from serial steps) and each
  split side's (its own curves, from a simulated start-up calibration and from every pipelined
  step's side passes, routed by ``FrontierGenerator._observe_pass``);
- ``FrontierGenerator._wanted_lengths`` / ``_run_step`` (which steps pipeline: decodes only, some
  draft longer than a frontier), ``_Run`` (a request's progress through its frontiers) and
  ``_finish``: commit, roll-back of the slots of drafts not kept, counters and the policy's
  feedback (``observe``, ``observe_pruning``); serial steps are ``SimulatedGenerator``'s.

A pipelined step, on the virtual clock:
1. the first frontier of every drafting request is drafted on the whole machine, as a serial
   step drafts (``SimulatedGenerator._simulate_drafts``, preemptible between passes);
2. then rounds: the target verifies frontier j of every live request on its side of the split
   while the draft side makes frontier j+1 for the requests that have one.  The round lasts
   max(verification on the target side, the draft side's passes), each priced by the profile's
   split curves (``cost_profile.SplitCost``: a side's pass while the other runs), with the
   context term where the profile has one (a frontier's verification reads each request's
   committed KV plus its drafts up to the frontier's end; a draft pass, each request's draft KV
   up to its feed).  A round in
   which nothing is drafted (the last frontiers) verifies on the whole machine, as the real
   generator does when no draft round is in flight;
3. a request leaves the pipeline at its frontier's first rejection, as the acceptance model
   says: the step's accepted count is the serial step's (``MatchSequence.accepted`` at the step's
   position for its k drafts), split over the frontiers in order.  The draft side's work for a
   request rejected in the round it was drafting for is discarded (its passes are still paid).

Early exit inside a frontier's verification is modelled as in a serial pass
(``SimulatedEarlyExit.run``: recorded scores, the real prune rule, segments priced at the rows
left, on the side the pass runs on).  One simplification: a frontier's drafts draw recorded
scores by their position inside the frontier, not inside the step.

Not modelled: the interpreter lock and thread hand-offs between the lane and the scheduler
(folded into the split costs when they were measured with both sides in one process, as the CPU
profile's were); each side's passes are priced at their "both sides busy" cost for the whole
round, even after the other side has finished its part.
"""

from __future__ import annotations

import contextlib

from faser_sgl.sim.generator import DUMMY_TOKEN, SimulatedGenerator
from faser_sgl.speculative.early_exit import Verification
from faser_sgl.speculative.frontier import FrontierGenerator, _Run
from faser_sgl.speculative.spec_generator import DraftPreempted

# The real calibration keeps the lane busy with draft passes of these row counts (frontier.py).
CALIBRATION_DRAFT_ROWS = (1, 2, 4, 8)


class SimSplit:
    """Stands for a ``lanes.py`` split: its name and the profile's costs on each side.  There is
    no thread to bind, so both sides are empty contexts; the generator's ``_on_side`` still marks
    which side a pass ran on, so that its cost reaches the controller's curve for that side."""

    lane = None

    def __init__(self, cost):
        self.cost = cost  # cost_profile.SplitCost
        self.name = cost.name

    def draft_side(self):
        return contextlib.nullcontext()

    def target_side(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def pipeline_splits(profile, pipeline_split: int | None) -> tuple[list[SimSplit], str | None]:
    """The profile's splits a setting may use (``--faser-pipeline-split``: None, every split the
    profile prices, as the server measures a few candidates; N: the split whose draft side has N
    cores or SMs), and why there are none, if so."""
    costs = list(getattr(profile, "splits", None) or [])
    if not costs:
        return [], (f"the cost profile {profile.name!r} has no 'splits' section (no pass costs on "
                    "the sides of a hardware split): steps run serially")
    if pipeline_split is not None:
        costs = [c for c in costs if c.draft_share == pipeline_split]
        if not costs:
            return [], (f"--faser-pipeline-split {pipeline_split}: the cost profile {profile.name!r} "
                        f"prices no split with that draft share (it has "
                        f"{[(s.name, s.draft_share) for s in profile.splits]}): steps run serially")
    return [SimSplit(c) for c in costs], None


class SimulatedFrontierGenerator(FrontierGenerator, SimulatedGenerator):
    """MRO: FrontierGenerator's step logic over SimulatedGenerator's priced passes."""

    def __init__(self, executor, policy, allocator, stop_checker, max_step_tokens, acceptance_of,
                 early_exit=None, *, splits: list[SimSplit], frontier_size: int | None = None):
        super().__init__(executor, policy, allocator, stop_checker, max_step_tokens, acceptance_of,
                         early_exit, splits=splits, frontier_size=frontier_size)

    # -- costs ---------------------------------------------------------------------------------
    def _side_pass(self, split, model: str, tokens: int, seconds: float | None = None,
                   context: int = 0) -> float:
        """Charge one pass on ``split``'s side for ``model`` (None: the whole machine) without
        moving the clock, and report it where the real generator would: the controller's curve
        for that side, or the whole machine's curves and the policy.  ``context``: the KV tokens
        its attention reads (cached + fed, over its requests)."""
        if seconds is None:
            seconds = self._pass_seconds(split, model, tokens, context)
        seconds = self.executor.charge(model, seconds, advance=False, tokens=tokens, context=context)
        side = (split.target_side if model == "target" else split.draft_side) if split else None
        with self._on_side(split, side) if split else contextlib.nullcontext():
            self._observe_pass(model, tokens, seconds)
        return seconds

    def _pass_seconds(self, split, model: str, tokens: float, context: float = 0) -> float:
        return self.executor.seconds(model, tokens, context) if split is None else \
            split.cost.seconds(model, tokens, context)

    def calibrate(self, repeats: int = 2) -> float:
        """The serial calibration, then each split's as ``FrontierGenerator.calibrate`` does it:
        target passes of 1..K+1 rows on the target side while the draft side runs draft passes
        of 1, 2, 4 and 8 rows, each timed on its side (here: priced, no virtual time passes)."""
        SimulatedGenerator.calibrate(self, repeats)
        kmax = getattr(self.policy, "max_k", None) or getattr(self.policy, "k", 4)
        sizes = list(range(1, kmax + 2))
        if not self.splits or self.allocator.num_free < max(sizes) + 8:
            return 0.0
        for split in self.splits:
            for _ in range(repeats):
                for n in sizes:
                    self._calibration_pass(split, "target", n)
                for n in CALIBRATION_DRAFT_ROWS:
                    self._calibration_pass(split, "draft", n)
        return 0.0

    def _calibration_pass(self, split, model: str, tokens: int) -> None:
        # As SimulatedGenerator.calibrate: the pass's attention reads its own n tokens.
        seconds = self._pass_seconds(split, model, tokens, tokens) * self.executor.noise()
        with self._on_side(split, split.target_side if model == "target" else split.draft_side):
            self._observe_pass(model, tokens, seconds)

    # -- the pipelined step --------------------------------------------------------------------
    def _pipelined_step(self, chunks, lengths, catch_up, mode):
        """FrontierGenerator._pipelined_step with priced passes (module docstring)."""
        decodes = [c.req for c in chunks]
        runs = {id(r): _Run(k, min(k, mode.size), len(r.kv_slots) - k) for r, k in zip(decodes, lengths)}
        try:  # the first frontier, on the whole machine, preemptible like a serial draft phase
            self._simulate_drafts(decodes, lengths, catch_up, goals={i: run.size for i, run in runs.items()})
        except DraftPreempted:
            self._abandon_drafts(decodes, lengths)
            return None
        self.num_pipelined_steps += 1
        # Drafts the target accepts of each request's k, asked as the serial step asks: the same
        # acceptance sequence decides, whatever the frontiers.
        accepted = {id(q): self.acceptance_of(q).accepted(len(q.output_ids), runs[id(q)].k) for q in decodes}
        made = {id(q): runs[id(q)].size for q in decodes}
        split = mode.split
        live, r = list(decodes), 0
        while live:
            more = [q for q in live if runs[id(q)].span(r)[1] < runs[id(q)].k]
            goals = {id(q): runs[id(q)].span(r + 1)[1] for q in more}
            drafting = self._sim_draft_round(split, more, goals, made) if more else 0.0
            verifying, verifications = self._sim_verify_frontier(live, r, runs, accepted, split if more else None)
            self.executor.clock.now += max(verifying, drafting)
            for q in live:
                self._sim_accept_frontier(q, r, runs[id(q)], verifications.get(id(q)), accepted[id(q)])
            live = [q for q in live if not runs[id(q)].done]
            r += 1
            self.num_frontiers += 1
        self.last_frontiers = r
        return self._finish(decodes, runs)

    def _sim_draft_round(self, split, reqs, goals, made) -> float:
        """The draft side's passes until each request in ``reqs`` has its ``goals`` drafts (as
        ``_extend_drafts`` on the lane: a row per unfinished request per pass); returns their
        seconds, run one after another on that side."""
        seconds = 0.0
        reqs = [q for q in reqs if made[id(q)] < goals[id(q)]]
        while reqs:
            for q in reqs:
                q.draft_cached += 1  # the pass reads the draft KV up to and including its feed
                made[id(q)] += 1
            seconds += self._side_pass(split, "draft", len(reqs), context=sum(q.draft_cached for q in reqs))
            reqs = [q for q in reqs if made[id(q)] < goals[id(q)]]
        return seconds

    def _sim_verify_frontier(self, live, r: int, runs, accepted, split):
        """One target pass over frontier r of every live request, on ``split``'s target side
        (None: the whole machine); returns its seconds and early exit's Verification per request.
        Frontier 0 feeds each request's newest token too; a later frontier's first draft is
        verified by the row held from the round before, so the pass scores the rest."""
        tokens, context, verifications, outcomes = 0, 0, {}, {}
        for i, q in enumerate(live):
            run = runs[id(q)]
            start, end = run.span(r)
            tokens += (1 if r == 0 else 0) + end - start
            context += run.base + end  # committed KV (to the newest token) + drafts to the frontier's end
            first = start if r == 0 else start + 1
            if self.early_exit is not None and end > first:
                v = Verification(i, end - first, None, accept_rate=self._accept_rate(q))
                verifications[id(q)] = v
                # Accepted of the drafts this pass scores (-1: the held row rejects the first).
                outcomes[i] = min(end, accepted[id(q)]) - first
        if not verifications:
            return self._side_pass(split, "target", tokens, context=context), verifications
        left = {id(q): runs[id(q)].k - runs[id(q)].span(r)[0] for q in live}  # drafts still to verify
        spt = self._seconds_per_token(live, left, tokens)
        seconds = self.early_exit.run(tokens, list(verifications.values()), outcomes, spt,
                                      lambda n: self._pass_seconds(split, "target", n, context - (tokens - n)))
        pruned = sum(v.num_drafts - v.verified for v in verifications.values())
        self.num_pruned_rows += pruned
        if pruned and self.on_early_exit is not None:
            self.on_early_exit(pruned)
        return self._side_pass(split, "target", tokens, seconds, context), verifications

    def _sim_accept_frontier(self, q, r: int, run: _Run, v, accepted_total: int) -> None:
        """FrontierGenerator._accept_frontier with the acceptance model's verdict instead of the
        target's rows: the same counts of tested, accepted and emitted tokens, the same ends of a
        run (rejection, early-exit prune, last frontier) and early exit's feedback."""
        start, end = run.span(r)
        if run.k == 0:  # a plain decode riding along: its one row gives its token
            run.emitted, run.done = [DUMMY_TOKEN], True
            return
        scored = v.verified if v is not None else end - (start if r == 0 else start + 1)
        count = scored + (0 if r == 0 else 1)  # drafts tested now (later frontiers: + the held row's)
        bonus = v.bonus if v is not None else True
        accepted = max(0, min(count, accepted_total - start))
        # SpeculativeGenerator._accept: the accepted drafts and the target's token, except that
        # a fully accepted frontier whose bonus row was pruned ends without one.
        emitted = [DUMMY_TOKEN] * (accepted + 1 if accepted < count or bonus else accepted)
        # The real booking (FrontierGenerator._close_frontier); no stop tokens in the simulator.
        self._close_frontier(run, r, v, count, accepted, bonus, emitted, end < run.k)

    # -- the record ----------------------------------------------------------------------------
    def pipeline_stats(self) -> dict:
        return {"simulated": True, **self.controller.as_dict(), "pipelined_steps": self.num_pipelined_steps,
                "frontiers": self.num_frontiers,
                "split_costs_ms": self.controller.cost_table()}
