"""FASER early exit in the simulator: the real decision rule fed with recorded predictor scores.

The real verifier (speculative/early_exit.EarlyExitVerifier) scores each draft token at each exit
layer (lens margin, draft probability), turns the scores into flags (a fixed threshold, or the
online ``RejectionCalibration`` for ``auto``), picks where to prune (the first flag, or, with the
adaptive policy's cost model, the position whose expected saving is largest) and learns from
the full-depth verdicts afterwards.  Here the scores come from recorded verifications of the
real pair (``records.py``): a simulated draft at position j that the acceptance model accepts
(or rejects first, or rejects after an earlier rejection) gets the scores of a recorded draft of
the same kind and position, drawn at random.  Everything after the scores is the real verifier's
code: its flags, ``_p_right``, ``_choose_prune``, ``record_outcome`` and statistics.

Cost: the pass runs in segments between exit layers; a segment costs the cost profile's pass
time at the rows still in the pass (and, with a context term, at the context left: each pruned
row is one token fewer fed and read), times the segment's share of the depth, so pruned rows
cost only the layers before their exit.  The predictor's own cost (10-20 ms of a drafting step on
the 2-core CPU in bf16) is not modelled: scoring costs nothing here, so the real verifier's gate
(``worth_scoring``) leaves a step unscored only where no prune could save anything at all.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from faser_sgl.speculative.early_exit import (ExitConfig, EarlyExitVerifier, Verification,
                                              parse_exit_layers, parse_exit_threshold)
from faser_sgl.sim.records import RecordedVerification, load_records

# Depth of the recorded target (Qwen2.5-Coder-1.5B: 28 layers); exit layers are counts of it.
RECORDED_NUM_LAYERS = 28


class _NoLens:
    """Stands in for the lens predictor: the simulator supplies recorded scores instead."""

    def __bool__(self):
        return True


class ScorePool:
    """Recorded per-layer scores of draft tokens, by kind and draft position."""

    def __init__(self, verifications: list[RecordedVerification]):
        self.pools: dict[tuple[str, int], list[dict]] = {}
        for v in verifications:
            a = v.accepted
            for j, d in enumerate(v.drafts, start=1):
                self.pools.setdefault((self.kind(j, a), min(j, 3)), []).append(d.scores)
                self.pools.setdefault((self.kind(j, a), 0), []).append(d.scores)

    @staticmethod
    def kind(j: int, accepted: int) -> str:
        return "accepted" if j <= accepted else "first" if j == accepted + 1 else "later"

    def draw(self, j: int, accepted: int, rng: np.random.Generator) -> dict:
        kind = self.kind(j, accepted)
        pool = self.pools.get((kind, min(j, 3))) or self.pools.get((kind, 0)) or \
            self.pools[next(iter(self.pools))]
        return pool[int(rng.integers(len(pool)))]


class SimulatedEarlyExit:
    """Decides the prunes of one simulated verification pass and prices the pass."""

    def __init__(self, records_path, layers: str, threshold, draft_prob: float, cost_model,
                 rng: np.random.Generator, num_layers: int = RECORDED_NUM_LAYERS):
        verifications, recorded_layers = load_records(records_path)
        config = ExitConfig(parse_exit_layers(layers, num_layers), parse_exit_threshold(threshold),
                            draft_prob)
        missing = [e for e in config.layers if e not in recorded_layers]
        if missing:
            raise ValueError(f"exit layers {missing} have no records in {records_path} "
                             f"(recorded: {recorded_layers})")
        runner = SimpleNamespace(model=SimpleNamespace(num_layers=num_layers))
        if cost_model is not None and not hasattr(cost_model, "target_cost"):
            cost_model = None
        # The real verifier object: its calibration, prune choice, statistics and labelling.
        self.verifier = EarlyExitVerifier(runner, config, predictor=_NoLens(), cost_model=cost_model)
        self.pool = ScorePool(verifications)
        self.rng = rng
        self.num_layers = num_layers

    @property
    def config(self) -> ExitConfig:
        return self.verifier.config

    @property
    def cost_model(self):
        return self.verifier.cost_model

    @property
    def stats(self):
        return self.verifier.stats

    @property
    def scoring_cost(self):
        return self.verifier.scoring_cost

    def worth_scoring(self, step_rows: int, draft_rows: int) -> bool:
        return self.verifier.worth_scoring(step_rows, draft_rows)

    def observe_scoring(self, draft_rows: int, seconds: float) -> None:
        self.verifier.observe_scoring(draft_rows, seconds)  # 0 s: scoring is not priced here

    def record_outcome(self, v: Verification, accepted: int) -> None:
        self.verifier.record_outcome(v, accepted)

    def unseen_rejection(self, v: Verification, accepted: int) -> float | None:
        return self.verifier.unseen_rejection(v, accepted)

    def run(self, total_tokens: int, verifications: list[Verification], outcomes: dict[int, int],
            seconds_per_token: float | None, pass_seconds) -> float:
        """Decide every prune of the pass (setting each Verification's verified/bonus/pruned_at)
        and return the pass's seconds.  ``outcomes``: accepted drafts per Verification.index,
        as the acceptance model will decide them at full depth; ``pass_seconds(tokens)``: the
        cost profile's full-depth time of a target pass."""
        ver = self.verifier
        ver._seconds_per_token = seconds_per_token
        ver.stats.draft_rows += sum(v.num_drafts for v in verifications)
        scores = {v.index: [self.pool.draw(j, outcomes[v.index], self.rng)
                            for j in range(1, v.num_drafts + 1)] for v in verifications}
        rows, start, seconds = total_tokens, 0, 0.0
        for layer in ver.config.layers:
            seconds += pass_seconds(rows) * (layer - start) / self.num_layers
            start = layer
            rows -= self._decide(layer, verifications, scores, rows)
        return seconds + pass_seconds(rows) * (self.num_layers - start) / self.num_layers

    def _decide(self, layer: int, verifications: list[Verification], scores: dict, total_rows: int) -> int:
        """EarlyExitVerifier._decide without tensors: flags from the recorded scores, then the
        real prune choice.  Returns the rows pruned after this layer."""
        ver = self.verifier
        stats = ver.stats.layer(layer)
        pruned = 0
        for v in verifications:
            scored = v.rows - 1  # rows 0..rows-2 of the block predict d_1..d_{rows-1}
            if scored <= 0:
                continue
            m = [scores[v.index][j][layer][0] for j in range(scored)]
            p = [scores[v.index][j][layer][1] for j in range(scored)]
            right = ver._p_right(layer, m, p)
            flags = ver.flags(right, m, p)
            stats.scored += scored
            v.predicted_at[layer], v.margins_at[layer] = flags, m
            if v.draft_probs is None:
                v.draft_probs = [s[layer][1] for s in scores[v.index]]
            j = ver._choose_prune(layer, v, flags, right, total_rows - pruned)
            if j is None:
                continue
            drop = v.rows - j
            pruned += drop
            stats.rows_pruned += drop
            ver.stats.layer_rows_saved += drop * (self.num_layers - layer)
            v.verified, v.bonus, v.pruned_at = j, False, layer
        return pruned
