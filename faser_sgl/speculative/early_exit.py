"""FASER's token-wise early exit inside the target's verification pass.

The verification pass runs its layers in segments.  After each exit layer a predictor scores
the draft tokens still in the pass; where it predicts that draft token d_j will be rejected,
the rows of d_j, d_{j+1}, ... of that request leave the pass: the remaining layers run on the
survivors only (the ragged batch is cut, the attention backend re-planned).

What stays lossless, whatever the predictor says: row r of a request's verification block is
the target's distribution for the token after it, so the row of d_{j-1} (or of the newest token
for j = 1) verifies d_j.  Pruning at d_j drops only the rows that verify d_{j+1}.. and give the
bonus token: d_1..d_j are still verified at full depth, exactly as a draft of length j would be,
and the pass simply has no bonus token when all j are accepted.  Nothing computed at an
intermediate layer accepts a token.

Why the rule is lossless (the argument every change here must keep true).  Call J the last draft
position verified at full depth.  Rejection sampling emits the target's law at position j + 1
whenever the decision "test d_{j+1}" (J > j) is a function of d_1..d_j and of things independent
of the draft's later tokens: then, given d_1..d_j, d_{j+1} is still a fresh draw from q when it
is tested (min(1, p/q) and the residual give p), and when it is not, the next step draws that
position from the target itself.  So J must be a stopping time of the draft sequence.  Each
exit layer e scans a request's positions in order and stops at the first j whose criterion
C(e, j) holds; C(e, j) reads only d_j's own scores (its lens margin comes from the row of
d_{j-1}, which causal attention keeps blind to later tokens; its draft probability; j), the
calibration learnt from earlier passes, the request's planned length and acceptance estimate
(fixed before drafting) and the other requests' rows (their drafts are independent of this
one's).  J is the minimum over layers of those first hits, and {J > j} = "no C(e, i) holds for
any layer e and i <= j": a function of d_1..d_j.  Two tempting rules break this and are
checked against by tests: choosing among positions the one with the best net saving (the value
of d_{j+1} then decides whether d_{j+1} is tested: an unlikely d_{j+1} wins the comparison and is
tested, a likely one loses it and is redrawn, so unlikely tokens come out too often), and
pricing a prune at a later exit layer by the rows an earlier layer's prune left (that count
depends on the later token that triggered it).  Dropping d_j itself and sampling a bonus token
from the row of d_{j-1} instead is not lossless either: "test d_j or resample" would depend on
d_j.  For greedy and coupled sampling every rule emits the same tokens (each position's token is
a function of the target's row), so only rejection sampling needs the argument.

The predictor (LensPredictor): a restricted logit lens, gated by the draft's own confidence.
The intermediate hidden state of the row that predicts d_j goes through the final norm and is
multiplied by the LM-head rows of a few candidates only: d_j and the draft model's own top
alternatives at that position.  Two ways to turn its margin (d_j's lens logit minus the best
alternative's) and the draft's probability of d_j into a verdict: with ``--faser-exit-threshold
auto`` (the default) a calibration learnt online from the pass's own full-depth verdicts gives
the chance that a prune at d_j is right (``RejectionCalibration``); with a number, d_j is
predicted rejected when the margin is below minus that number and the draft gave d_j less than
``draft_prob``.  Its cost is a norm and a [rows x candidates x hidden] product, nothing like a
full LM head.
Measured on the embedded pair (docs/benchmarks.md, scripts/bench_early_exit.py), the lens alone
barely beats the base rate of rejections at any layer of the 1.5B target; the draft's
probability carries most of the signal, and the two together reach precision ~0.7.

Whether a predicted rejection is pruned is then a cost decision when the policy has a cost model
(the adaptive drafter's, under ``--speculative-policy faser``): pruning saves the dropped rows'
share of the remaining layers, priced on the target's measured cost curve at this pass's size,
and risks, if d_j is in fact accepted, the tokens those rows would have emitted (expected from
the request's acceptance rate), priced at the step's seconds per token; the chance of that is
one minus the calibrated chance (auto; every draft position is a candidate) or one minus the
exit layer's precision so far (a fixed threshold; predicted rejections are the candidates), and
the first candidate in draft order whose net saving is positive is pruned (a stopping rule, see
above).  Without a cost model (fixed K) the first predicted
rejection is pruned.  On a CPU at small batch rows are cheap and little is pruned; in a big, compute-bound pass rows cost and predicted rejections are pruned.

Scoring itself costs: the draft's top alternatives and confidence at every draft pass, the lens
product and a host sync at every exit layer, and the bookkeeping (10-20 ms of a 0.3-0.6 s
drafting step on a 2-core CPU in bf16).  Where no prune can pay, that is pure loss, so a step's
drafts are scored only when they might (``worth_scoring``): decided before drafting from the
step's shape alone (its rows and draft rows, the target's cost curve and the measured cost of
scoring), so it says nothing about any draft token and cannot touch losslessness.  While it
says no, one drafting step in ``PROBE_EVERY`` is scored anyway, so that the cost of scoring and
the calibration stay measured.  The bound is weighed by the share of scored draft rows that
prunes actually removed lately (``prune_share``, from a prior of PRUNE_PRIOR_SHARE): a bound that
only says a prune *could* pay kept the embedded pair's steps scored on a CPU where not one row
of 1,767 scored was pruned in a whole load run (2026-12-07 16:24 UTC, docs/benchmarks.md),
~9 ms of every drafting step for nothing.

Pruned positions' full-depth verdict of d_j is known after the pass, so every prune is labelled
right or wrong for free (``ExitStats``); a diagnostic mode runs full depth and only records what
would have been pruned, which also measures recall.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.speculative.adaptive import CostCurve, expected_tokens

DEFAULT_CANDIDATES = 8
DEFAULT_THRESHOLD = None  # "auto": calibrated online (RejectionCalibration), no fixed threshold
DEFAULT_DRAFT_PROB = 0.5


def parse_exit_threshold(text) -> float | None:
    """``auto`` (None: online calibration) or a lens margin threshold (a float)."""
    if text is None or str(text).strip() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"the exit threshold must be 'auto' or a number, got {text!r}") from None


def parse_exit_layers(text: str, num_layers: int) -> list[int]:
    """``auto`` (half and three quarters of the depth) or comma-separated layer counts in
    1 .. num_layers - 1: the pass may exit after that many layers."""
    if text.strip() == "auto":
        layers = [num_layers // 2, (3 * num_layers) // 4]
    else:
        try:
            layers = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"exit layers must be 'auto' or comma-separated integers, got {text!r}") from None
    layers = sorted(set(layers))
    bad = [x for x in layers if not 0 < x < num_layers]
    if bad or not layers:
        raise ValueError(f"exit layers must lie in 1..{num_layers - 1} (the model has {num_layers} "
                         f"layers), got {text!r}")
    return layers


@dataclass
class ExitConfig:
    layers: list[int]
    # Prune when an alternative beats d_j by more than this (and the draft prob gate holds);
    # None ("auto"): prune by the calibrated rejection probability instead.
    threshold: float | None = DEFAULT_THRESHOLD
    draft_prob: float = DEFAULT_DRAFT_PROB  # ... and the draft gave d_j less than this (1.0: any)
    num_candidates: int = DEFAULT_CANDIDATES
    diagnostic: bool = False  # full depth always; only record what would have been pruned


@dataclass
class LayerStats:
    scored: int = 0  # draft tokens scored at this layer
    predicted: int = 0  # of those, predicted rejected (pruned, or would have been in diagnostics)
    predicted_right: int = 0  # predicted rejected and the full model rejected them
    first_rejections: int = 0  # scored tokens that were the first rejected token of their run
    first_rejections_caught: int = 0  # ... and predicted rejected here
    rows_pruned: int = 0  # rows that skipped the layers after this one

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["precision"] = self.predicted_right / self.predicted if self.predicted else None
        d["recall"] = (self.first_rejections_caught / self.first_rejections
                       if self.first_rejections else None)
        return d


@dataclass
class ExitStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    draft_rows: int = 0  # draft-token rows that entered verification passes
    layer_rows_saved: int = 0  # sum over pruned rows of the layers they skipped
    scored_steps: int = 0  # drafting steps whose drafts were scored (probes included)
    probe_steps: int = 0  # ... of those, scored only to keep the figures measured
    unscored_steps: int = 0  # drafting steps left unscored: no prune could have paid

    def layer(self, e: int) -> LayerStats:
        return self.layers.setdefault(e, LayerStats())

    def as_dict(self) -> dict:
        pruned = sum(s.rows_pruned for s in self.layers.values())
        return {"draft_rows": self.draft_rows, "rows_pruned": pruned,
                "exit_ratio": pruned / self.draft_rows if self.draft_rows else None,
                "layer_rows_saved": self.layer_rows_saved, "scored_steps": self.scored_steps,
                "probe_steps": self.probe_steps, "unscored_steps": self.unscored_steps,
                "layers": {e: s.as_dict() for e, s in sorted(self.layers.items())}}


class RejectionCalibration:
    """P(a prune at d_j is right | exit layer, draft prob, lens margin, j), learnt online.

    Every draft token verified at full depth labels its scores for free: a prune at d_j would
    have been right iff j > accepted.  The scores are binned (draft probability in fifths, the
    lens margin in three ranges, j as 1, 2, 3+), and each cell's rate has a Beta prior centred
    on its layer's overall rate, so a cell with few labels says what the layer says.  This is
    the ``auto`` threshold: no constant to tune per model pair, and on a pair where the signal
    is weak the rates stay near the base rate and nothing is pruned."""

    PRIOR_RATE, PRIOR_WEIGHT = 0.3, 4.0
    PROB_EDGES = (0.2, 0.4, 0.6, 0.8)
    MARGIN_EDGES = (-2.0, 0.0)

    def __init__(self):
        self.cells: dict[tuple, list[float]] = {}  # key -> [right, labelled]
        self.layers: dict[int, list[float]] = {}

    def _key(self, layer: int, margin: float, prob: float | None, j: int) -> tuple:
        prob_bin = sum(prob >= e for e in self.PROB_EDGES) if prob is not None else -1
        return layer, prob_bin, sum(margin >= e for e in self.MARGIN_EDGES), min(j, 3)

    def p_right(self, layer: int, margin: float, prob: float | None, j: int) -> float:
        right, n = self.layers.get(layer, (0.0, 0.0))
        w = self.PRIOR_WEIGHT
        base = (right + self.PRIOR_RATE * w) / (n + w)
        right, n = self.cells.get(self._key(layer, margin, prob, j), (0.0, 0.0))
        return (right + base * w) / (n + w)

    def observe(self, layer: int, margin: float, prob: float | None, j: int, right: bool) -> None:
        for table, key in ((self.cells, self._key(layer, margin, prob, j)), (self.layers, layer)):
            counts = table.setdefault(key, [0.0, 0.0])
            counts[0] += right
            counts[1] += 1


class LensPredictor:
    """Restricted logit lens over the draft's candidates (see the module docstring)."""

    def __init__(self, model):
        self.norm = model.model.norm
        self.weight = model.plain_lm_head_weight()

    def margins(self, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] rows that predict the scored tokens; candidates [n, C] with the scored
        draft token in column 0.  Returns d_j's lens logit minus the best other candidate's
        (+inf when there is none): [n] float32."""
        h = self.norm(hidden)
        w = self.weight[candidates]  # [n, C, H]
        logits = torch.einsum("nh,nch->nc", h, w).float()
        others = logits[:, 1:].masked_fill(candidates[:, 1:] == candidates[:, :1], float("-inf"))
        if others.shape[1] == 0:
            return torch.full((hidden.shape[0],), float("inf"), device=hidden.device)
        return logits[:, 0] - others.max(dim=1).values


@dataclass
class Verification:
    """One request's draft in a verification pass: rows of the batch it owns and its draft."""
    index: int  # request index in the batch
    num_drafts: int  # k
    candidates: torch.Tensor  # [k, C] per draft token, the token itself in column 0
    verified: int = -1  # drafts verified at full depth (k unless pruned)
    bonus: bool = True  # whether the last row (the bonus token) survived
    pruned_at: int | None = None  # the exit layer after which its last rows left the pass
    predicted_at: dict[int, list[bool]] = field(default_factory=dict)  # flags per exit layer
    margins_at: dict[int, list[float]] = field(default_factory=dict)  # lens margins per exit layer
    draft_probs: list[float] | None = None  # the draft's probability of each of its tokens
    accept_rate: float = 0.7  # the policy's estimate for this request (prices a wrong prune)

    def __post_init__(self):
        if self.verified < 0:
            self.verified = self.num_drafts

    @property
    def rows(self) -> int:
        """Rows this request still has in the pass: newest + verified drafts (+1 if bonus)."""
        return self.verified + (1 if self.bonus else 0)


class EarlyExitVerifier:
    """Runs a target verification pass in segments and prunes predicted rejections."""

    # While no prune can pay, every this many drafting steps one is scored all the same.
    PROBE_EVERY = 16
    # Share of scored draft rows pruned: the prior (as rows at a share) and the decay of the
    # counts per scored pass (the last ~50 passes count).
    PRUNE_PRIOR_SHARE = 0.25
    PRUNE_PRIOR_ROWS = 32.0
    PRUNE_DECAY = 0.98

    def __init__(self, runner, config: ExitConfig, predictor: LensPredictor | None = None,
                 cost_model=None):
        """cost_model: an object with ``target_cost`` (a CostCurve, as the adaptive policy
        has): predicted rejections are pruned only where that pays; None: always."""
        self.runner = runner
        self.config = config
        self.predictor = predictor or LensPredictor(runner.model)
        # The calibration learns in every mode: under ``auto`` it decides the prunes, and in
        # every mode it prices what a prune hid from the drafter (``unseen_rejection``).
        self.auto = config.threshold is None
        self.calibration = RejectionCalibration()
        self.cost_model = cost_model
        self._seconds_per_token = None
        self.stats = ExitStats()
        # Seconds that scoring adds to a step, by the step's draft rows (observe_scoring), and
        # the scoring time of the verification pass under way (take_scoring_seconds).
        self.scoring_cost = CostCurve(0.0, 0.0)
        self._pass_scoring_s = 0.0
        self._unscored_run = 0  # drafting steps left unscored since the last scored one
        self._pruned_rows, self._scored_rows = 0.0, 0.0  # decayed, for prune_share
        # Diagnostic mode keeps every scored token as (layer, j, margin, draft prob, rejected,
        # first rejection of its run), so that other thresholds can be evaluated afterwards.
        self.records: list[tuple[int, int, float, float | None, bool, bool]] = []
        num_layers = runner.model.num_layers
        if any(not 0 < e < num_layers for e in config.layers):
            raise ValueError(f"exit layers {config.layers} outside 1..{num_layers - 1}")

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, verifications: list[Verification],
                seconds_per_token: float | None = None) -> torch.Tensor:
        """Float32 logits of the surviving logits rows, in batch order; each Verification's
        ``verified``/``bonus`` say which of its rows survived.  ``seconds_per_token``: what a
        token emitted by this step costs (predicted step time / expected tokens), the price of
        a token lost to a wrong prune."""
        self._seconds_per_token = seconds_per_token
        runner = self.runner
        model, kv, attn = runner.model, runner.kv_cache, runner.attn
        if batch.input_ids.device != runner.device:
            batch = batch.to(runner.device)
        attn.begin_forward(batch)
        hidden = model.embed(batch.input_ids)
        cos, sin = model.rope(batch, hidden.dtype)
        scored_rows = sum(v.num_drafts for v in verifications)
        self.stats.draft_rows += scored_rows
        pruned_before = sum(layer.rows_pruned for layer in self.stats.layers.values())
        start = 0
        for layer in self.config.layers:
            hidden = model.forward_layers(hidden, batch, kv, attn, start, layer, (cos, sin))
            start = layer
            if hidden.is_cuda:  # time the scoring, not the layers before it (_decide syncs anyway)
                torch.cuda.current_stream(hidden.device).synchronize()
            scoring_start = time.perf_counter()
            keep = self._decide(layer, hidden, batch, verifications)
            if keep is not None:
                hidden, cos, sin = hidden[keep[0]], cos[keep[0]], sin[keep[0]]
                batch = batch.truncate(keep[1])
                attn.begin_forward(batch)
            self._pass_scoring_s += time.perf_counter() - scoring_start
        hidden = model.forward_layers(hidden, batch, kv, attn, start, model.num_layers, (cos, sin))
        pruned = sum(layer.rows_pruned for layer in self.stats.layers.values()) - pruned_before
        self._observe_prunes(scored_rows, pruned)
        return model.compute_logits(hidden[batch.logits_indices])

    def _observe_prunes(self, scored_rows: int, pruned_rows: int) -> None:
        self._scored_rows = self._scored_rows * self.PRUNE_DECAY + scored_rows
        self._pruned_rows = self._pruned_rows * self.PRUNE_DECAY + min(pruned_rows, scored_rows)

    def prune_share(self) -> float:
        """Share of recently scored draft rows that prunes removed, beside the prior."""
        prior = self.PRUNE_PRIOR_ROWS
        return (self._pruned_rows + self.PRUNE_PRIOR_SHARE * prior) / (self._scored_rows + prior)

    def worth_scoring(self, step_rows: int, draft_rows: int) -> bool:
        """Whether to score the drafts of a step whose target pass will carry ``step_rows``
        rows, ``draft_rows`` of them drafts; asked before drafting (module docstring).

        No prune can save more than every draft row's share of the layers after the first exit
        layer, and none at all where that is free: that bound, priced on the target's cost
        curve and weighed by the share of recently scored rows that prunes removed
        (``prune_share``), against what scoring costs at this many draft rows (measured;
        unmeasured, it is scored and so measured).  Without a cost model (fixed K prunes the first predicted
        rejection) and in diagnostics, every step is scored."""
        if draft_rows <= 0:
            return False
        if self.cost_model is None or self.config.diagnostic or not self.scoring_cost.measured:
            return True
        curve = self.cost_model.target_cost
        num_layers = self.runner.model.num_layers
        share = (num_layers - self.config.layers[0]) / num_layers
        best_saving = (curve.predict(step_rows) - curve.predict(step_rows - draft_rows)) * share
        if best_saving * self.prune_share() > self.scoring_cost.predict(draft_rows):
            self._unscored_run = 0
            return True
        self._unscored_run += 1
        if self._unscored_run >= self.PROBE_EVERY:
            self._unscored_run = 0
            self.stats.probe_steps += 1
            return True
        self.stats.unscored_steps += 1
        return False

    def take_scoring_seconds(self) -> float:
        """Seconds the verification pass just run spent scoring (its exit layers' decisions);
        the caller keeps them out of the pass's cost."""
        seconds, self._pass_scoring_s = self._pass_scoring_s, 0.0
        return seconds

    def observe_scoring(self, draft_rows: int, seconds: float) -> None:
        """What scoring a step with ``draft_rows`` drafts cost in all (draft side and pass)."""
        self.scoring_cost.observe(max(1, draft_rows), max(0.0, seconds))
        self.stats.scored_steps += 1

    def _decide(self, layer: int, hidden: torch.Tensor, batch: ForwardBatch,
                verifications: list[Verification]):
        """Score every draft token that may still be pruned; cut requests at their first
        predicted rejection.  Returns (kept row indices, new q per request) or None."""
        qo = batch.qo_indptr.tolist()
        rows, cands, owners = [], [], []
        for v in verifications:
            scored = v.rows - 1  # rows 0..rows-2 of the block predict d_1..d_{rows-1}
            if scored <= 0:
                continue
            first = qo[v.index + 1] - v.rows  # the block is the request's last rows
            rows.extend(range(first, first + scored))
            cands.append(v.candidates[:scored])
            owners.append((v, scored))
        if not rows:
            return None
        device = hidden.device
        margins = self.predictor.margins(hidden[torch.tensor(rows, device=device)],
                                         torch.cat(cands).to(device)).tolist()
        probs = [p for v, n in owners for p in (v.draft_probs or [None] * n)[:n]]
        total_rows = batch.num_tokens
        stats = self.stats.layer(layer)
        new_q = [qo[i + 1] - qo[i] for i in range(len(qo) - 1)]
        changed = False
        offset = 0
        for v, scored in owners:
            m, p = margins[offset: offset + scored], probs[offset: offset + scored]
            offset += scored
            right = self._p_right(layer, m, p)
            flags = self.flags(right, m, p)
            stats.scored += scored
            v.predicted_at[layer], v.margins_at[layer] = flags, m
            if self.config.diagnostic:
                continue
            j = self._choose_prune(layer, v, flags, right, total_rows)
            if j is None:
                continue
            drop = v.rows - j  # rows of d_j .. d_k (and the bonus row)
            total_rows -= drop
            stats.rows_pruned += drop
            self.stats.layer_rows_saved += drop * (self.runner.model.num_layers - layer)
            v.verified, v.bonus, v.pruned_at = j, False, layer
            new_q[v.index] -= drop
            changed = True
        if not changed:
            return None
        keep = [r for i in range(len(qo) - 1) for r in range(qo[i], qo[i] + new_q[i])]
        return torch.tensor(keep, device=device), new_q

    def flags(self, right: list[float], margins: list[float], probs: list) -> list[bool]:
        """Per scored d_j, whether it is predicted rejected: calibrated chance of a right prune
        at least one half (auto), else the lens rule with the draft-probability gate."""
        if self.auto:
            return [r >= 0.5 for r in right]
        return [m < -self.config.threshold and (p or 0.0) < self.config.draft_prob for m, p in zip(margins, probs)]

    def _p_right(self, layer: int, margins: list[float], probs: list) -> list[float]:
        """Per scored d_j, the chance that a prune there is right: calibrated per score (auto),
        else the exit layer's precision so far (one figure for every flagged token)."""
        if self.auto:
            return [self.calibration.p_right(layer, m, p, j)
                    for j, (m, p) in enumerate(zip(margins, probs), start=1)]
        stats = self.stats.layer(layer)
        return [(stats.predicted_right + 1) / (stats.predicted + 2)] * len(margins)  # Beta(1, 1)

    def _choose_prune(self, layer: int, v: Verification, flags: list[bool], right: list[float],
                      total_rows: int) -> int | None:
        """The draft position j to prune v at after ``layer`` (keep d_1..d_j), or None.

        A stopping rule, scanned in draft order: the first j that is a candidate (predicted
        rejected; under ``auto`` every position) and, with a cost model, whose expected net
        saving is positive.  Whether the scan stops at j then depends on d_1..d_j and never on
        d_{j+1}.. (module docstring, "Why the rule is lossless").  Taking the j with the best
        saving instead, as an earlier version did, let the value of a later draft token decide
        whether an earlier one's successor is tested, which biases rejection sampling."""
        if self.cost_model is None or self._seconds_per_token is None:
            return flags.index(True) + 1 if any(flags) else None
        # Price every position as if nothing of v had been pruned yet: v's rows in the pass
        # as drafted (fixed before any draft token existed), other requests' rows as they
        # stand.  The rows left after an earlier exit layer's prune depend on the later token
        # that triggered it, so they must not enter the decision about an earlier position.
        planned_rows = v.num_drafts + 1
        rows_as_drafted = total_rows - v.rows + planned_rows
        for j, flagged in enumerate(flags, start=1):
            if not (flagged or self.auto):
                continue
            wrong = 1.0 - right[j - 1]
            if self._net_saving(layer, v, planned_rows - j, rows_as_drafted, wrong) > 0:
                return j
        return None

    def _net_saving(self, layer: int, v: Verification, drop: int, total_rows: int, wrong: float) -> float:
        """Seconds that dropping ``drop`` rows of ``v`` after ``layer`` saves, minus what it
        risks: with chance ``wrong`` the pruned d_j would have been accepted, and the dropped
        rows would have emitted 1 + a + ... tokens, each worth the step's seconds per token."""
        curve = self.cost_model.target_cost
        layers_left = (self.runner.model.num_layers - layer) / self.runner.model.num_layers
        saved_s = (curve.predict(total_rows) - curve.predict(total_rows - drop)) * layers_left
        lost_s = wrong * expected_tokens(v.accept_rate, drop - 1) * self._seconds_per_token
        return saved_s - lost_s

    def record_outcome(self, v: Verification, accepted: int) -> None:
        """Label this pass's predictions with the full-depth verdicts: d_j was rejected iff
        j > accepted.  Only d_1..d_verified have verdicts (the rest were pruned unverified)."""
        first_rejected = accepted + 1 if accepted < v.verified else None
        for layer, flags in v.predicted_at.items():
            stats = self.stats.layer(layer)
            for j, flag in enumerate(flags, start=1):
                if j > v.verified:
                    break
                if flag:
                    stats.predicted += 1
                    stats.predicted_right += j > accepted
                prob = v.draft_probs[j - 1] if v.draft_probs else None
                self.calibration.observe(layer, v.margins_at[layer][j - 1], prob, j, j > accepted)
                if j == first_rejected:
                    stats.first_rejections += 1
                    stats.first_rejections_caught += flag
                if self.config.diagnostic:
                    self.records.append((layer, j, v.margins_at[layer][j - 1], prob, j > accepted,
                                         j == first_rejected))


    def unseen_rejection(self, v: Verification, accepted: int) -> float | None:
        """What a prune hid from the acceptance estimate.  When it cut a run whose verified
        drafts were all accepted, d_{verified+1} would have been tested next and its verdict is
        unknown; prunes happen where rejections are predicted, so leaving it out would bias the
        drafter's estimate upward.  Returns the calibrated chance that it would have been
        rejected (from its score at the exit layer that pruned it), or None when the prune hid
        no draft (a rejection came first, or only the bonus row was dropped)."""
        j = v.verified
        if v.pruned_at is None or accepted < j or j >= v.num_drafts:
            return None
        margins = v.margins_at.get(v.pruned_at, [])
        if len(margins) <= j:
            return None
        prob = v.draft_probs[j] if v.draft_probs and len(v.draft_probs) > j else None
        return self.calibration.p_right(v.pruned_at, margins[j], prob, j + 1)


def make_early_exit(runner, layers: str = "auto", threshold: float | str | None = DEFAULT_THRESHOLD,
                    candidates: int = DEFAULT_CANDIDATES, diagnostic: bool = False,
                    draft_prob: float = DEFAULT_DRAFT_PROB, cost_model=None) -> EarlyExitVerifier:
    """The verifier for a target runner, from the server's --faser-exit-* options.
    ``cost_model``: the policy, when it has a target cost curve (prunes only where it pays)."""
    config = ExitConfig(parse_exit_layers(layers, runner.model.num_layers), parse_exit_threshold(threshold),
                        draft_prob, candidates, diagnostic)
    if cost_model is not None and not hasattr(cost_model, "target_cost"):
        cost_model = None
    return EarlyExitVerifier(runner, config, cost_model=cost_model)
