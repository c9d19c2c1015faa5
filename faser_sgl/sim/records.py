"""Recorded verifications of the real model pair: what acceptance and early exit are drawn from.

``scripts/bench_early_exit.py --records-out FILE`` runs the real pair with fixed K and early
exit in diagnostic mode (full depth, predictions only recorded) and writes every scored draft
token once per exit layer: ``[layer, j, lens margin, draft probability, rejected at full
depth, first rejection of its run]``.  docs/results/early_exit_records.json is one such run
(HumanEval-style prompts, greedy, K=4).  Grouping one layer's records by j (it restarts at 1
for each verification) gives every verification's drafts in order, hence its accepted count,
and the other layers' records give what the exit predictor said about the same drafts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RECORDS = Path(__file__).resolve().parents[2] / "docs" / "results" / "early_exit_records.json"


@dataclass
class RecordedDraft:
    rejected: bool  # at full depth
    first_rejection: bool  # the first rejected draft of its verification
    # exit layer -> (lens margin, draft probability of this token)
    scores: dict[int, tuple[float, float | None]] = field(default_factory=dict)


@dataclass
class RecordedVerification:
    drafts: list[RecordedDraft]

    @property
    def num_drafts(self) -> int:
        return len(self.drafts)

    @property
    def accepted(self) -> int:
        return _leading_accepted(self.drafts)


def _leading_accepted(drafts: list[RecordedDraft]) -> int:
    n = 0
    for d in drafts:
        if d.rejected:
            break
        n += 1
    return n


def load_records(path: str | Path = DEFAULT_RECORDS) -> tuple[list[RecordedVerification], list[int]]:
    """Every recorded verification in order, and the exit layers that were scored."""
    data = json.loads(Path(path).read_text())
    fields = data["fields"]
    col = {name: fields.index(name) for name in
           ("layer", "j", "margin", "draft_prob", "rejected", "first_rejection")}
    rows = data["records"]
    layers = sorted({int(r[col["layer"]]) for r in rows})
    if not layers:
        raise ValueError(f"{path}: no records")
    # The records of one verification are written layer after layer; a draft is identified by
    # its verification's ordinal (counted on each layer separately) and its j.
    verifications: dict[int, list[RecordedDraft]] = {}
    counters = {layer: -1 for layer in layers}
    for r in rows:
        layer, j = int(r[col["layer"]]), int(r[col["j"]])
        if j == 1:
            counters[layer] += 1
        drafts = verifications.setdefault(counters[layer], [])
        if layer == layers[0]:
            drafts.append(RecordedDraft(bool(r[col["rejected"]]), bool(r[col["first_rejection"]])))
        if j - 1 < len(drafts):
            drafts[j - 1].scores[layer] = (float(r[col["margin"]]),
                                           None if r[col["draft_prob"]] is None else float(r[col["draft_prob"]]))
    return [RecordedVerification(v) for _, v in sorted(verifications.items()) if v], layers
