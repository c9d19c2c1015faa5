"""Which drafts the simulated target accepts.

A request's acceptance is a *match sequence* over its output positions: entry p is 1 when the
draft model, given the request's true output before p, proposes the target's token at p.
Under greedy decoding this is exact for every draft length: drafts d_1..d_k made at position p
are accepted up to the first 0 in entries p..p+k-1 (d_j is only tested if d_1..d_{j-1} matched,
and then it was drafted from the true prefix).  Under sampling it is the usual approximation.

Sources (``load_acceptance``):
- ``bernoulli:A``: every entry 1 with probability A, independently (tests, what-if runs);
- a JSONL trace; an optional first line ``{"format": "faser-sim-acceptance", "pooled": false,
  "source": "..."}``, then one line per recorded request with ``"matches"`` (a list of 1/0/null
  or a string of ``1``/``0``/``?``; null/``?``: not observed) or ``"steps"`` (``[[k,
  accepted], ...]`` in order, converted: each step gives ``accepted`` ones, then a 0, or an
  unobserved entry where all k were accepted and the target's bonus token was never drafted);
- a records file of scripts/bench_early_exit.py (``records.py``), used as one pooled sequence.

Each simulated request draws its own sequence: a per-request trace line at random (from its
start), or a pooled sequence from a random offset, cycling.  Unobserved entries, and entries past
a per-request line's end, are drawn at the rate the trace shows after a match.  All draws come
from the request's own generator, so every setting meets the same sequence for the same request
(whatever lengths it drafts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from faser_sgl.sim.records import load_records


class MatchSequence:
    """One request's match entries, drawn lazily and remembered."""

    def __init__(self, base: list, rng: np.random.Generator, fill_rate: float, offset: int = 0,
                 cyclic: bool = False):
        self.base = base  # 1 / 0 / None entries; may be empty (then all entries are drawn)
        self.rng = rng
        self.fill_rate = fill_rate
        self.offset = offset
        self.cyclic = cyclic and bool(base)
        self._entries: list[bool] = []

    def _entry(self, position: int) -> bool:
        while len(self._entries) <= position:
            p = len(self._entries) + self.offset
            if self.cyclic:
                p %= len(self.base)
            value = self.base[p] if p < len(self.base) else None
            # Always draw, so that entry p's draw does not depend on what the trace holds.
            drawn = bool(self.rng.random() < self.fill_rate)
            self._entries.append(drawn if value is None else bool(value))
        return self._entries[position]

    def accepted(self, position: int, k: int) -> int:
        """Drafts accepted of k made at output position ``position``."""
        n = 0
        while n < k and self._entry(position + n):
            n += 1
        return n


class AcceptanceModel:
    """A set of match sequences; ``for_request`` hands one to each simulated request."""

    def __init__(self, sequences: list[list], pooled: bool, name: str, fill_rate: float | None = None):
        self.sequences = [s for s in sequences if s] or [[]]
        self.pooled = pooled
        self.name = name
        self.fill_rate = match_rate_after_match(self.sequences) if fill_rate is None else fill_rate

    def for_request(self, rng: np.random.Generator) -> MatchSequence:
        base = self.sequences[int(rng.integers(len(self.sequences)))]
        offset = int(rng.integers(len(base))) if self.pooled and base else 0
        return MatchSequence(base, rng, self.fill_rate, offset, cyclic=self.pooled)

    def describe(self) -> str:
        known = [v for s in self.sequences for v in s if v is not None]
        rate = f", match rate {np.mean(known):.3f} over {len(known)} positions" if known else ""
        return f"{self.name}{rate}"


def match_rate_after_match(sequences: list[list]) -> float:
    """P(entry = 1 | the entry before it is 1), from the observed pairs (0.5 if none)."""
    hits = total = 0
    for s in sequences:
        for a, b in zip(s, s[1:]):
            if a == 1 and b is not None:
                total += 1
                hits += int(b == 1)
    return hits / total if total else 0.5


def steps_to_matches(steps: list) -> list:
    """Per-step ``(k, accepted)`` in order -> match entries (see the module docstring)."""
    out: list = []
    for k, accepted in steps:
        if not 0 <= accepted <= k:
            raise ValueError(f"a step of {k} drafts cannot accept {accepted}")
        out += [1] * accepted
        out.append(0 if accepted < k else None)
    return out


def _parse_matches(value) -> list:
    if isinstance(value, str):
        table = {"1": 1, "0": 0, "?": None}
        return [table[c] for c in value if not c.isspace()]
    return [None if v is None else int(bool(v)) for v in value]


def read_trace(path: str | Path) -> AcceptanceModel:
    pooled, source, sequences = False, str(path), []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry.get("format") == "faser-sim-acceptance":
            pooled = bool(entry.get("pooled", False))
            source = entry.get("source", source)
        elif "matches" in entry:
            sequences.append(_parse_matches(entry["matches"]))
        elif "steps" in entry:
            sequences.append(steps_to_matches(entry["steps"]))
        else:
            raise ValueError(f"{path}: a line has neither 'matches' nor 'steps': {line[:80]}")
    if not sequences:
        raise ValueError(f"{path}: no acceptance sequences")
    return AcceptanceModel(sequences, pooled, f"trace {source}")


def from_records(path: str | Path) -> AcceptanceModel:
    verifications, _ = load_records(path)
    steps = [(v.num_drafts, v.accepted) for v in verifications]
    return AcceptanceModel([steps_to_matches(steps)], pooled=True,
                           name=f"recorded verifications {path} ({len(steps)} steps, pooled)")


def load_acceptance(spec: str) -> AcceptanceModel:
    if spec.startswith("bernoulli:"):
        rate = float(spec.split(":", 1)[1])
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"acceptance rate must lie in [0, 1], got {rate}")
        return AcceptanceModel([[]], pooled=False, name=f"Bernoulli({rate:g})", fill_rate=rate)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"acceptance {spec!r} is neither 'bernoulli:RATE' nor a file")
    head = path.read_text()[:200].lstrip()
    if head.startswith("{") and '"fields"' in head:
        return from_records(path)
    return read_trace(path)
