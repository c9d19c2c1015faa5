"""FASER's frontier pipeline: verify a draft in chunks while the next chunk is being drafted.

A request's draft of k tokens is cut into frontiers of F tokens.  The first frontier is drafted
as in a serial step (the whole machine, nothing to overlap yet); then, round after round, the
target verifies frontier j on its side of a hardware split (``lanes.py``) while the draft lane
produces frontier j+1 for every request still alive.  A frontier is verified like a prefill
chunk appended to the request's KV: its tokens write their KV, and its rows give the target's
distribution after each of them.  The row after the last token of frontier j ("held") verifies
the first token of frontier j+1, so the tokens are tested in order exactly as one verification of
all k would test them, and the output is the serial step's (greedy, coupled sampling) or has its
distribution (rejection sampling: each draft still meets min(1, p/q) with a fresh uniform; the
bonus token drawn at the end of a fully accepted frontier is dropped when the next frontier
follows, and its row tests that frontier's first token instead).  A rejection, an early-exit
prune or a stop token ends the request's speculation for the step: the lane's work beyond it is
discarded and the slots go back to the pool, as a serial step's rejected drafts do.

Whether a step pipelines at all, with which frontier size and split, and with which lengths, is
the controller's choice (``FrontierController``) from measured pass costs: on the whole machine
for serial steps, and on each side of each split while the other side runs.  Verifying in
frontiers costs one target pass per frontier, so the pipeline pays only where a draft pass is
expensive next to a verification pass and the split slows each side little.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.managers.request import Request
from faser_sgl.speculative.adaptive import CostCurve, expected_tokens
from faser_sgl.speculative.early_exit import Verification
from faser_sgl.speculative.lanes import make_splits, parse_auto_count
from faser_sgl.speculative.spec_generator import DraftPreempted, SpeculativeGenerator


def parse_frontier_size(text) -> int | None:
    """``--faser-frontier-size``: 'auto' (None: the controller chooses), 0 (serial
    draft-then-verify) or a pinned frontier size."""
    return parse_auto_count(text, "the frontier size")


@dataclass
class _Mode:
    """How a step runs: serial (split None) or pipelined on ``split`` in frontiers of ``size``."""
    split: object | None = None
    size: int = 0

    @property
    def label(self) -> str:
        return "serial" if self.split is None else f"{self.split.name} F={self.size}"


class FrontierController:
    """Per step: the draft lengths, the frontier size and the hardware split, chosen together by
    expected tokens per predicted second.  Costs come from measured passes: the generator's
    whole-machine curves, and per split the target's and the draft's passes timed while the other
    side ran (calibrated at start-up, then every pipelined step's own passes)."""

    # Before a split is measured: each side runs this much slower than on the whole machine.
    SPLIT_SLOWDOWN_PRIOR = 1.5

    def __init__(self, generator, splits: list, pinned_size: int | None = None, joint_lengths: bool = True):
        self.gen = generator
        self.splits = splits
        self.pinned_size = pinned_size
        self.joint_lengths = joint_lengths  # also try uniform lengths (adaptive policies)
        self.curves = {s.name: {"target": CostCurve(0.0, 0.0), "draft": CostCurve(0.0, 0.0)} for s in splits}
        self.choices: Counter = Counter()  # mode label -> steps
        self.enabled = True  # False: every step serial (benchmarks switch the pipeline off)

    # -- costs ---------------------------------------------------------------------------------
    def cost(self, split, model: str, tokens: float) -> float:
        """Seconds of a pass of ``tokens`` tokens: on the whole machine (split None) or on that
        side of ``split`` while the other side runs."""
        whole = self.gen.pass_costs[model]
        if split is None:
            return whole.predict(tokens)
        curve = self.curves[split.name][model]
        return curve.predict(tokens) if curve.measured else self.SPLIT_SLOWDOWN_PRIOR * whole.predict(tokens)

    def _expected_pass(self, split, model: str, weights: list[float]) -> float:
        """Expected seconds of a pass whose requests each take part with these probabilities
        (one token each): no pass when none does."""
        weights = [w for w in weights if w > 0]
        if not weights:
            return 0.0
        p_any = 1.0 - math.prod(1.0 - min(w, 1.0) for w in weights)
        return p_any * self.cost(split, model, max(1.0, sum(weights) / max(p_any, 1e-9)))

    def predict(self, lengths: list[int], rates: list[float], mode: _Mode) -> float:
        """Predicted seconds of a step with these lengths (decodes only)."""
        kmax = max(lengths, default=0)
        if mode.split is None or kmax == 0:
            drafting = sum(self.cost(None, "draft", sum(k >= m for k in lengths)) for m in range(1, kmax + 1))
            return drafting + self.cost(None, "target", sum(k + 1 for k in lengths))
        f = mode.size
        seconds = sum(self.cost(None, "draft", sum(min(k, f) >= m for k in lengths)) for m in range(1, f + 1))
        rounds = max(math.ceil(k / f) for k in lengths)
        for r in range(rounds):
            alive = [rate ** (r * f) if k > r * f else 0.0 for k, rate in zip(lengths, rates)]
            rows = [a * (min(k - r * f, f) + (1 if r == 0 else 0)) for a, k in zip(alive, lengths)]
            if r == 0:
                rows = [x if k else 1.0 for x, k in zip(rows, lengths)]  # plain decodes ride along
            p_any = 1.0 - math.prod(1.0 - a for a in alive) if r else 1.0
            drafting = sum(self._expected_pass(mode.split, "draft",
                                               [a for a, k in zip(alive, lengths) if k - (r + 1) * f >= m])
                           for m in range(1, f + 1))
            side = mode.split if drafting else None
            verify = p_any * self.cost(side, "target", max(1.0, sum(rows) / max(p_any, 1e-9)))
            seconds += max(verify, drafting)
        return seconds

    # -- choice --------------------------------------------------------------------------------
    def choose(self, reqs: list[Request], wanted: list[int], caps: list[int]) -> tuple[list[int], _Mode]:
        """The step's lengths and mode, starting from the policy's lengths ``wanted``; ``caps``
        bound each request's length."""
        if not self.enabled:
            return list(wanted), _Mode()
        rates = [self.gen._accept_rate(r) for r in reqs]
        candidates = [list(wanted)]
        if self.joint_lengths and self.pinned_size is None:  # a pinned size keeps the policy's
            candidates += [[min(u, c) for c in caps] for u in range(1, max(caps, default=0) + 1)]
        best = (list(wanted), _Mode())
        best_rate = -1.0
        for lengths in candidates:
            kmax = max(lengths, default=0)
            modes = [] if lengths != list(wanted) or self.pinned_size is not None else [_Mode()]
            if self.pinned_size is not None and self.pinned_size >= kmax:
                modes = [_Mode()]  # one frontier holds every draft: serial
            sizes = [self.pinned_size] if self.pinned_size is not None else range(1, kmax)
            modes += [_Mode(s, f) for s in self.splits for f in sizes if 0 < f < kmax]
            tokens = sum(expected_tokens(a, k) for a, k in zip(rates, lengths))
            for mode in modes:
                rate = tokens / max(self.predict(lengths, rates, mode), 1e-9)
                if rate > best_rate:
                    best, best_rate = (lengths, mode), rate
        self.choices[best[1].label] += 1
        return best

    def observe(self, split, model: str, tokens: int, seconds: float) -> None:
        self.curves[split.name][model].observe(tokens, seconds)

    def cost_table(self, target_rows=(1, 2, 3, 4, 5), draft_rows=(1, 2, 4, 8)) -> list[str]:
        """Predicted ms per pass, whole machine and each side of each split (for benchmarks)."""
        lines = []
        for split in [None] + list(self.splits):
            name = "whole machine, in turn" if split is None else f"{split.name}, both sides busy"
            t = " ".join(f"{1000 * self.cost(split, 'target', n):.0f}" for n in target_rows)
            d = " ".join(f"{1000 * self.cost(split, 'draft', n):.0f}" for n in draft_rows)
            lines.append(f"| {name} | {t} | {d} |")
        return lines

    def as_dict(self) -> dict:
        return {"splits": [s.name for s in self.splits], "pinned_size": self.pinned_size,
                "choices": dict(self.choices)}


@dataclass
class _Run:
    """One request's progress through the step's frontiers."""
    k: int  # draft slots held
    size: int  # its frontier size
    base: int  # KV slots up to its newest token
    emitted: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # figures of emitted, if the request asked
    accepted: int = 0
    tested: int = 0  # drafts verified at full depth
    held: torch.Tensor | None = None  # the target's row after the last verified token
    done: bool = False
    keep_last_kv: bool = True  # False: the last accepted draft's KV was pruned unfinished
    pruned_from: int | None = None  # drafts verified before early exit pruned the rest
    skipped: float = 0.0  # share of the depth the pruned rows skipped
    unseen_rejection: float | None = None  # early exit's chance for the first draft a prune hid

    def span(self, r: int) -> tuple[int, int]:
        return r * self.size, min(self.k, (r + 1) * self.size)


class FrontierGenerator(SpeculativeGenerator):
    """SpeculativeGenerator whose steps may run as a frontier pipeline (module docstring)."""

    def __init__(self, *args, splits: list, frontier_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.splits = splits
        self.controller = FrontierController(self, splits, frontier_size,
                                             joint_lengths=hasattr(self.policy, "max_k"))
        self._local = threading.local()  # .split: the split whose side this thread's passes ran on
        self._mode = _Mode()
        self.num_pipelined_steps = 0
        self.num_frontiers = 0  # target passes of pipelined steps
        self.last_frontiers = 0  # frontiers verified in the last step that verified anything

    def close(self) -> None:
        for split in self.splits:
            split.close()

    # -- cost measurement ----------------------------------------------------------------------
    def _observe_pass(self, model: str, tokens: int, seconds: float) -> None:
        split = getattr(self._local, "split", None)
        if split is None:
            super()._observe_pass(model, tokens, seconds)
        else:
            self.controller.observe(split, model, tokens, seconds)

    @contextlib.contextmanager
    def _on_side(self, split, side):
        self._local.split = split
        try:
            with side():
                yield
        finally:
            self._local.split = None

    def calibrate(self, repeats: int = 2) -> float:
        """The serial calibration, then each split's: target passes of 1..K+1 rows on the target
        side while the lane keeps running draft passes, which are timed too."""
        seconds = super().calibrate(repeats)
        kmax = getattr(self.policy, "max_k", None) or getattr(self.policy, "k", 4)
        sizes = list(range(1, kmax + 2))
        if not self.splits or self.allocator.num_free < max(sizes) + 8:
            return seconds
        start = time.perf_counter()
        slots = self.allocator.alloc(max(sizes) + 8)
        try:
            for split in self.splits:
                stop = threading.Event()

                def draft_loop(split=split, stop=stop):
                    with self._on_side(split, split.draft_side):
                        n = 0
                        while not stop.is_set():
                            count = (1, 2, 4, 8)[n % 4]
                            feeds = [[0]] * count
                            self._timed("draft", feeds, self.draft.forward, feeds, [[s] for s in slots[:count]])
                            n += 1

                future = split.lane.submit(draft_loop)
                try:
                    with self._on_side(split, split.target_side):
                        for _ in range(repeats):
                            for n in sizes:
                                feeds = [[0] * n]
                                self._timed("target", feeds, self.target.forward,
                                            ForwardBatch.build(feeds, [slots[:n]], [list(range(n))]))
                finally:
                    stop.set()
                    future.result()
        finally:
            self.allocator.free(slots)
        return seconds + time.perf_counter() - start

    # -- the step ------------------------------------------------------------------------------
    def _wanted_lengths(self, decodes: list[Request], step_tokens: int) -> list[int]:
        wanted = super()._wanted_lengths(decodes, step_tokens)
        if not self.splits:
            self._mode = _Mode()
            return wanted
        max_k = getattr(self.policy, "max_k", max(wanted, default=0))
        caps = []
        for req in decodes:
            cap = max_k if req.requested_draft_len is None else min(max_k, req.requested_draft_len)
            caps.append(max(0, min(cap, req.stop.max_new_tokens - len(req.output_ids) - 1)))
        lengths, self._mode = self.controller.choose(decodes, wanted, caps)
        return lengths

    def _run_step(self, chunks, decodes, lengths, catch_up):
        mode, self._mode = self._mode, _Mode()
        pipelined = mode.split is not None and len(chunks) == len(decodes) and max(lengths, default=0) > mode.size
        if not pipelined:
            out = super()._run_step(chunks, decodes, lengths, catch_up)
            if out:
                self.last_frontiers = 1
            return out
        return self._pipelined_step(chunks, lengths, catch_up, mode)

    def _pipelined_step(self, chunks, lengths: list[int], catch_up: dict[int, int],
                        mode: _Mode) -> dict[Request, list[int]] | None:
        decodes = [c.req for c in chunks]
        newest = {id(c.req): c.tokens for c in chunks}
        runs = {id(r): _Run(k, min(k, mode.size), len(r.kv_slots) - k) for r, k in zip(decodes, lengths)}
        try:  # the first frontier, on the whole machine, preemptible like a serial draft phase
            drafts, probs, cands = self._run_draft(decodes, lengths, catch_up,
                                                   goals={i: run.size for i, run in runs.items()})
        except DraftPreempted:
            self._abandon_drafts(decodes, lengths)
            return None
        self.num_pipelined_steps += 1
        split = mode.split
        live, r = list(decodes), 0
        while live:
            # Frontier r+1 of every live request, drafted while frontier r is verified.
            more = [q for q in live if runs[id(q)].span(r)[1] < runs[id(q)].k]
            goals = {id(q): runs[id(q)].span(r + 1)[1] for q in more}
            future = None
            if more:
                future = split.lane.submit(self._draft_round, split, more, goals, drafts, probs, cands)
            try:
                with self._on_side(split, split.target_side) if future else contextlib.nullcontext():
                    rows, counts, verifications = self._verify_frontier(live, r, runs, newest, drafts, cands)
            finally:
                if future is not None:
                    future.result()  # the lane no longer touches the step's state
            offset = 0
            for q, n_rows in zip(live, counts):
                self._accept_frontier(q, r, runs[id(q)], rows[offset: offset + n_rows],
                                      verifications.get(id(q)), drafts, probs)
                offset += n_rows
            live = [q for q in live if not runs[id(q)].done]
            r += 1
            self.num_frontiers += 1
        self.last_frontiers = r
        for q in decodes:
            self._draft_confidence.pop(id(q), None)
        return self._finish(decodes, runs)

    def _draft_round(self, split, reqs, goals, drafts, probs, cands) -> None:
        with self._on_side(split, split.draft_side):
            self._extend_drafts(reqs, goals, drafts, probs, cands)

    def _verify_frontier(self, live, r: int, runs, newest, drafts, cands):
        """One target pass over frontier r of every live request; returns the surviving logits
        rows, how many of them each request owns, and early exit's Verification per request."""
        feeds, slot_lists, rows, verifications = [], [], [], {}
        for q in live:
            run = runs[id(q)]
            start, end = run.span(r)
            tokens = (list(newest[id(q)]) if r == 0 else []) + drafts[id(q)][start:end]
            # Drafts the pass itself scores: frontier 0's all; later, all but the first, which
            # the held row verifies.
            first = start if r == 0 else start + 1
            if self._scoring and end > first:
                confidence = self._draft_confidence.get(id(q))
                verifications[id(q)] = Verification(
                    len(feeds), end - first, torch.stack(cands[id(q)][first:end]),
                    draft_probs=confidence[first:end] if confidence else None,
                    accept_rate=self._accept_rate(q))
            feeds.append(tokens)
            slot_lists.append(q.kv_slots[: run.base + end])
            rows.append(list(range(len(tokens))))
        batch = ForwardBatch.build(feeds, slot_lists, rows)
        if verifications:
            left = {id(q): runs[id(q)].k - runs[id(q)].span(r)[0] for q in live}  # drafts still to verify
            logits = self._timed("target", feeds, self.early_exit.forward, batch, list(verifications.values()),
                                 self._seconds_per_token(live, left, batch.num_tokens))
            pruned = sum(v.num_drafts - v.verified for v in verifications.values())
            if pruned and self.on_early_exit is not None:
                self.on_early_exit(pruned)
        else:
            logits = self._timed("target", feeds, self.target.forward, batch)
        counts = [verifications[id(q)].rows if id(q) in verifications else len(f) for q, f in zip(live, feeds)]
        return logits, counts, verifications

    def _accept_frontier(self, q: Request, r: int, run: _Run, rows: torch.Tensor, v, drafts, probs) -> None:
        """Test frontier r's drafts in order against the held row and this pass's rows."""
        start, end = run.span(r)
        if run.k == 0:  # a plain decode riding along: its one row gives its token
            emitted, _ = self._accept(q, [], rows, None)
            run.emitted, run.done = emitted, True
            run.logprobs = self._emitted_logprobs.pop(id(q), [])
            return
        scored = v.verified if v is not None else end - (start if r == 0 else start + 1)
        count = scored + (0 if r == 0 else 1)  # drafts tested now
        bonus = v.bonus if v is not None else True
        if r > 0:
            rows = torch.cat([run.held[None], rows])
        test = drafts[id(q)][start: start + count]
        emitted, accepted = self._accept(q, test, rows, probs[id(q)][start: start + count], bonus,
                                         prefix=run.emitted)
        figures = self._emitted_logprobs.pop(id(q), [])
        before = len(run.emitted)
        stops = q.stop.stop_token_ids
        if self._close_frontier(run, r, v, count, accepted, bonus, emitted,
                                end < run.k and not any(t in stops for t in emitted[:-1])):
            run.held = rows[-1]  # the bonus row tests the next frontier's first draft
        run.logprobs += figures[: len(run.emitted) - before]

    def _close_frontier(self, run: _Run, r: int, v, count: int, accepted: int, bonus: bool,
                        emitted: list[int], may_go_on: bool) -> bool:
        """Book frontier r's verdict (``accepted`` of the ``count`` drafts tested, ``emitted``
        the tokens it gives) into ``run``, and early exit's feedback.  ``may_go_on``: another
        frontier follows and no stop token came.  True when the run goes on: the emitted
        tokens but the last are kept, and the bonus row tests the next frontier's first draft."""
        if v is not None and (r == 0 or accepted > 0):
            self.early_exit.record_outcome(v, accepted - (0 if r == 0 else 1))
        # (r > 0 with accepted == 0: the held row rejected this frontier's first draft, so the
        # drafts this pass scored were never reached: they have no verdict to label.)
        run.tested += count
        run.accepted += accepted
        if accepted < count:  # rejected: the target's token ends the run
            run.emitted += emitted
            run.done = True
        elif not bonus:  # pruned by early exit: no bonus row, the last token's KV unfinished
            run.emitted += emitted
            run.done, run.keep_last_kv = True, False
            run.pruned_from = run.tested
            run.skipped = 1.0 - v.pruned_at / self._target_depth()
            run.unseen_rejection = self.early_exit.unseen_rejection(v, accepted - (0 if r == 0 else 1))
        elif may_go_on:
            run.emitted += emitted[:-1]
            return True
        else:
            run.emitted += emitted
            run.done = True
        return False

    def _finish(self, decodes, runs) -> dict[Request, list[int]]:
        """Append what each request emitted, give back the slots of drafts not kept."""
        out = {}
        for q in decodes:
            run = runs[id(q)]
            if self.early_exit is not None and run.k and hasattr(self.policy, "observe_pruning"):
                self.policy.observe_pruning(run.k, run.pruned_from, run.skipped, run.accepted, self._accept_rate(q))
            if run.logprobs:
                self._emitted_logprobs[id(q)] = run.logprobs
            kept = self._commit(q, run.emitted)
            if run.k > 0:
                full_kv = run.accepted if run.keep_last_kv else run.accepted - 1
                rejected = run.k - full_kv
                if rejected:
                    self.allocator.free(q.kv_slots[-rejected:])
                    del q.kv_slots[-rejected:]
                q.draft_cached = min(q.draft_cached, len(q.kv_slots))
                # Drafts counted as a serial step counts them: all k, unless early exit pruned
                # (then those verified at full depth).  Counting only the frontiers tested
                # before a rejection made the pipeline's acceptance read higher than serial's.
                drafted = run.k if run.pruned_from is None else run.tested
                self._count_verification(q, drafted, run.accepted, kept, len(run.emitted), run.unseen_rejection)
            out[q] = run.emitted[:kept]
        return out


def make_generator(target_runner, draft_worker, sampler, policy, allocator, stop_checker, max_step_tokens,
                   early_exit=None, frontier_size: int | None = 0, split_share: int | None = None):
    """The step generator for the server's options: serial (``frontier_size`` 0) or able to
    pipeline (None: the controller decides per step; n > 0: frontiers of n, pinned), on the
    splits of this machine (``split_share``: the draft side's cores or SMs, None: candidates)."""
    args = (target_runner, draft_worker, sampler, policy, allocator, stop_checker, max_step_tokens)
    if frontier_size == 0:
        return SpeculativeGenerator(*args, early_exit=early_exit)
    splits = make_splits(target_runner.device, split_share)
    if not splits and frontier_size is not None:
        raise ValueError("--faser-frontier-size needs at least two CPU cores (or a GPU) to split "
                         "between the draft and the target model")
    return FrontierGenerator(*args, early_exit=early_exit, splits=splits, frontier_size=frontier_size)
