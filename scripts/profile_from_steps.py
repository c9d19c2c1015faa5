"""Fit a simulator cost profile from a running server's own step records.

    python scripts/profile_from_steps.py STEPS.jsonl [STEPS.jsonl ...] --out PROFILE.json \
        [--base docs/sim_validation/cpu_profile.json] [--machine "..."]

The step records come from ``--faser-record-steps PATH`` (faser_sgl/managers/step_recorder.py).
A profile fitted from them holds what the server paid under the very load it served: each pass's
time by model and token count, and a step overhead (``cost_profile.StepOverhead``) for what a
step costs besides its passes.  That is what the simulator's validation against real runs needs
(docs/simulation.md): a profile timed alone, in a separate process, misses the CPU the server's
own tokenizer, detokenizer and HTTP processes take from the same cores.

Pass curves: up to 16 tokens (decodes and verifications), a token count seen at least
``--min-samples`` times becomes a point at its mean time (the mean, not the median: the
simulator must add up to the real busy time, outliers included).  Larger passes (prefill chunks,
whose lengths rarely repeat) are pooled into power-of-two bins of tokens, a point per bin at its
mean size and mean time.  ``--base`` fills in sizes the records never saw (below or above the
observed range) from another profile.

Step overhead: per completed step, wall + gap - the sum of its passes, fitted by least squares
as fixed + per_request x requests + per_draft_pass x draft passes, with terms that come out
negative dropped.  Serial steps only: a pipelined step's passes overlap, so it is left out
(detected as passes whose total exceeds the step's wall time).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from faser_sgl.sim.cost_profile import MODELS, CostProfile, load_cost_profile  # noqa: E402


def read_steps(paths: list[str]) -> list[dict]:
    steps = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                steps.append(json.loads(line))
    return steps


def fit_curve(samples: list[tuple[int, float]], min_samples: int, exact_up_to: int = 16) -> list[list[float]]:
    """(tokens, seconds) samples -> [[tokens, ms], ...] (see the module docstring)."""
    by_count = defaultdict(list)
    for n, s in samples:
        by_count[n].append(s)
    points = {float(n): float(np.mean(v)) for n, v in by_count.items()
              if n <= exact_up_to and len(v) >= min_samples}
    # Larger passes (prefill chunks, with whatever decodes shared the step) rarely repeat a
    # count: pooled into power-of-two bins, each giving its samples' mean size and mean time.
    bins = defaultdict(list)
    for n, s in samples:
        if n > exact_up_to:
            bins[int(np.log2(n))].append((n, s))
    for members in bins.values():
        points[float(np.mean([n for n, _ in members]))] = float(np.mean([s for _, s in members]))
    return [[round(n, 2), round(points[n] * 1e3, 3)] for n in sorted(points)]


def merge_base(points: list[list[float]], base_curve) -> list[list[float]]:
    """Add the base profile's points outside the range the records covered."""
    if not points:
        return [[n, round(s * 1e3, 3)] for n, s in base_curve.points]
    lo, hi = points[0][0], points[-1][0]
    extra = [[n, round(s * 1e3, 3)] for n, s in base_curve.points if n < lo or n > hi]
    return sorted(points + extra)


def split_scales(donor) -> list[dict]:
    """The donor profile's pipeline splits as multiples of its own whole-machine curves (the mean
    ratio over the split curve's points), to apply to a fitted profile's curves: the records of
    serial steps say nothing about a split's sides."""
    out = []
    for split in donor.splits:
        entry = {"name": split.name, "draft_share": split.draft_share}
        for model in MODELS:
            side, whole = getattr(split, model), getattr(donor, model)
            pts = getattr(side, "points", None)
            if pts is None:  # already a scale
                entry[model] = {"scale": side.scale}
                continue
            entry[model] = {"scale": round(float(np.mean([s / whole.seconds(n) for n, s in pts])), 4)}
        out.append(entry)
    return out


def fit_overhead(steps: list[dict]) -> tuple[dict, dict]:
    rows, ys = [], []
    for step in steps:
        if step.get("preempted"):
            continue
        passes = sum(p[2] for p in step["passes"])
        if passes > step["wall"] * 1.001:  # pipelined: its passes overlapped
            continue
        drafts = sum(1 for p in step["passes"] if p[0] == "draft")
        rows.append([1.0, step["requests"], drafts])
        ys.append(step["wall"] + (step["gap"] or 0.0) - passes)
    if not rows:
        raise SystemExit("no serial step records to fit the step overhead from")
    x, y = np.array(rows), np.array(ys)
    names = ["fixed_ms", "per_request_ms", "per_draft_pass_ms"]
    keep = [i for i in range(3) if x[:, i].std() > 0 or i == 0]
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        negative = [k for k, c in zip(keep, coef) if c < 0 and k != 0]
        if not negative:
            break
        keep.remove(negative[0])
    terms = dict.fromkeys(names, 0.0)
    for k, c in zip(keep, coef):
        terms[names[k]] = round(max(float(c), 0.0) * 1e3, 3)
    fitted = x[:, keep] @ coef
    stats = {"steps": len(ys), "mean_ms": round(float(y.mean()) * 1e3, 3),
             "residual_sd_ms": round(float((y - fitted).std()) * 1e3, 3)}
    return terms, stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("steps", nargs="+", help="JSONL files written by --faser-record-steps")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default=None, help="a profile for sizes the records never saw")
    ap.add_argument("--name", default="fitted-from-steps")
    ap.add_argument("--machine", default="unspecified")
    ap.add_argument("--min-samples", type=int, default=3)
    ap.add_argument("--splits-from", default=None,
                    help="a profile whose pipeline splits (as multiples of its whole-machine "
                         "curves) the fitted profile takes over")
    args = ap.parse_args(argv)
    steps = read_steps(args.steps)
    samples = {m: [] for m in MODELS}
    for step in steps:
        for model, tokens, seconds in step["passes"]:
            samples[model].append((int(tokens), float(seconds)))
    base = load_cost_profile(args.base) if args.base else None
    profile = {"name": args.name, "machine": args.machine, "units": "ms"}
    for model in MODELS:
        points = fit_curve(samples[model], args.min_samples)
        if base is not None:
            points = merge_base(points, getattr(base, model))
        if not points:
            raise SystemExit(f"no {model} passes in the records and no --base to take them from")
        profile[model] = {"points": points}
    if args.splits_from:
        profile["splits"] = split_scales(load_cost_profile(args.splits_from))
    overhead, stats = fit_overhead(steps)
    profile["step_overhead"] = overhead
    profile["sources"] = {
        "fitted_from": [str(p) for p in args.steps], "base": args.base,
        "passes": {m: len(samples[m]) for m in MODELS}, "step_overhead_fit": stats,
        "splits": f"scaled as in {args.splits_from}, not measured here" if args.splits_from else None,
        "method": "scripts/profile_from_steps.py: mean pass time per token count seen "
                  f">= {args.min_samples} times, a line through rarer larger counts; step overhead "
                  "= wall + gap - passes, least squares on requests and draft passes"}
    CostProfile.from_dict(profile)  # the simulator must be able to read it
    Path(args.out).write_text(json.dumps(profile, indent=1) + "\n")
    print(json.dumps({"step_overhead_ms": overhead, **stats,
                      "target_points": len(profile["target"]["points"]),
                      "draft_points": len(profile["draft"]["points"])}))


if __name__ == "__main__":
    main()
