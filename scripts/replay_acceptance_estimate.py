"""Replay recorded verifications through the adaptive drafter's acceptance estimate and score it.

Input: files written by `--faser-record-acceptance` (one JSON line per request: its
[(drafts verified, accepted), ...] per verification).  Each request's verifications are fed, in
file order, to a fresh `AdaptiveLength` (its real observe / accept_rate); before each
verification the estimate is scored against the drafts that verification tested (accepted ones,
then the rejected one if any): mean log-loss and Brier score per tested draft.  Requests are
replayed one after another (the server interleaved them), so the population's counts see whole
earlier requests; use files of a policy that drafted regardless of the estimate (fixed K), or
the replay judges the estimate only on drafts it chose to make.

    python scripts/replay_acceptance_estimate.py docs/results/acceptance/fixed-k4.jsonl \
        --fixed-trials 2,5,10,20,40
"""

from __future__ import annotations

import argparse
import json
import math

from faser_sgl.speculative.adaptive import AdaptiveLength
from faser_sgl.speculative.prior_strength import PriorStrength
from faser_sgl.managers.request import Request, StopConditions


class _FixedStrength(PriorStrength):
    """A fixed prior weight (demotion of outlying requests still applies)."""
    def __init__(self, trials: float):
        super().__init__()
        self._trials = trials

    def trials(self, population_rate: float) -> float:
        return self._trials


def replay(path: str, fixed_trials: float | None = None, population_only: bool = False) -> dict:
    policy = AdaptiveLength(8)
    if fixed_trials is not None:
        policy.prior_strength = _FixedStrength(fixed_trials)
    loss = brier = 0.0
    tested_drafts = 0
    opening_trials = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            req = Request(rid=record["rid"], http_worker_ipc=None, prompt_ids=[0], sampling=None, stream=False,
                          stop=StopConditions(max_new_tokens=1, stop_token_ids=frozenset()))
            for drafted, accepted in record["steps"]:
                if drafted == 0:
                    continue
                if req.spec_accept_stats is None:
                    opening_trials.append(policy.prior_trials())
                estimate = policy.prior_rate() if population_only else policy.accept_rate(req)
                estimate = min(max(estimate, 1e-4), 1 - 1e-4)
                outcomes = [1] * accepted + ([0] if accepted < drafted else [])
                for outcome in outcomes:
                    loss -= math.log(estimate if outcome else 1 - estimate)
                    brier += (estimate - outcome) ** 2
                tested_drafts += len(outcomes)
                policy.observe(req, drafted, accepted)
    opening_trials.sort()
    return {"log_loss": loss / tested_drafts, "brier": brier / tested_drafts,
            "tested_drafts": tested_drafts,
            "opening_trials_median": opening_trials[len(opening_trials) // 2] if opening_trials else None,
            "opening_trials_last": opening_trials[-1] if opening_trials else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--fixed-trials", default="2,20",
                        help="comma-separated fixed prior weights to score beside the estimated one")
    args = parser.parse_args()
    for path in args.files:
        print(path)
        rows = [("estimated prior weight", replay(path))]
        rows += [(f"fixed {w:g} pseudo-trials", replay(path, fixed_trials=w))
                 for w in map(float, args.fixed_trials.split(","))]
        rows.append(("population rate alone", replay(path, population_only=True)))
        for name, r in rows:
            extra = f"  opening weight median {r['opening_trials_median']:.1f}" if name.startswith("estimated") else ""
            print(f"  {name:28s} log-loss {r['log_loss']:.4f}  brier {r['brier']:.4f}  "
                  f"({r['tested_drafts']} drafts){extra}")


if __name__ == "__main__":
    main()
