"""How well each setting's cost model predicted its own steps: ``--record-steps`` makes every
server write ``--faser-record-steps`` lines (faser_sgl/managers/step_recorder.py), in which a
speculative policy puts its predicted seconds for the step beside the measured ``wall``.  A
policy that chooses draft lengths from a cost model is only as good as those predictions, so
the load report states their error next to the latencies it caused.

The summary per setting goes into results.json's meta["prediction_error"]: the step files are
large and may be gone when the report is rebuilt with --report-only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# (key, label in the report): steps that ran a draft pass, the rest, and both together.
GROUPS = [("drafted", "drafted"), ("no_draft", "no draft"), ("all", "all")]


def steps_path(out_dir: Path, setting: str) -> Path:
    # A setting name is free text; a slash in it must not make a subdirectory.
    return Path(out_dir) / "steps" / (setting.replace("/", "_") + ".jsonl")


def _stats(ratios: list[float]) -> dict:
    """wall/predicted ratios -> count, median and p90 of |ratio - 1| in %, median ratio."""
    if not ratios:
        return {"n": 0, "median_abs_err_pct": None, "p90_abs_err_pct": None, "median_ratio": None}
    r = np.asarray(ratios, dtype=float)
    err = np.abs(r - 1.0) * 100.0
    return {"n": len(ratios), "median_abs_err_pct": float(np.median(err)),
            "p90_abs_err_pct": float(np.percentile(err, 90)), "median_ratio": float(np.median(r))}


def summarize_steps(path: Path) -> dict:
    """One step file -> {"steps": lines, "predicted": steps with a prediction,
    "groups": {drafted|no_draft|all: _stats}}; "groups" is None when no step carries a
    prediction (a setting without a cost model, such as ``none``)."""
    ratios: dict[str, list[float]] = {"drafted": [], "no_draft": []}
    steps = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            step = json.loads(line)
        except ValueError:
            continue  # the last line of a server that was killed mid-write
        if not isinstance(step, dict):
            continue
        steps += 1
        predicted, wall = step.get("predicted"), step.get("wall")
        if not predicted or predicted <= 0 or wall is None:
            continue
        drafted = any(p and p[0] == "draft" for p in step.get("passes") or [])
        ratios["drafted" if drafted else "no_draft"].append(wall / predicted)
    everything = ratios["drafted"] + ratios["no_draft"]
    groups = {key: _stats(everything if key == "all" else ratios[key]) for key, _ in GROUPS}
    return {"steps": steps, "predicted": len(everything), "groups": groups if everything else None}


def summarize_settings(out_dir: Path, settings: list[str]) -> dict:
    """Every setting's summary; None where its server left no step file."""
    out = {}
    for name in settings:
        path = steps_path(out_dir, name)
        out[name] = summarize_steps(path) if path.is_file() else None
    return out


def refresh(meta: dict, out_dir: Path) -> dict:
    """meta with the summaries of the step files present under out_dir put in place of the
    stored ones (--report-only after a crash, or with files added by hand)."""
    found = {name: summarize_steps(steps_path(out_dir, name)) for name in meta.get("settings", {})
             if steps_path(out_dir, name).is_file()}
    if not found:
        return meta
    return {**meta, "prediction_error": {**meta.get("prediction_error", {}), **found}}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def markdown(meta: dict) -> list[str]:
    """The report's section, or nothing when the run recorded no steps."""
    summaries = meta.get("prediction_error")
    if not summaries:
        return []
    out = ["", "## Cost model: predicted vs measured step time", "",
           "From each server's step records (`--record-steps`: `--faser-record-steps` into "
           "`steps/<setting>.jsonl`, every step of the server's life, its warm-up included). "
           "Per step, the policy's predicted seconds for the step it chose against the measured "
           "wall time from planning to outputs sent; error = \\|wall / predicted - 1\\|, and a "
           "ratio above 1 means the step took longer than predicted. Drafted: steps with a draft "
           "pass."]
    for name in meta["settings"]:
        if name not in summaries:
            continue
        s = summaries[name]
        if s is None:
            out += ["", f"- `{name}`: no step file"]
        elif s["groups"] is None:
            out += ["", f"- `{name}`: no cost model ({s['steps']} steps, none predicted)"]
        else:
            out += ["", f"### {name}", "", f"{s['steps']} steps recorded, {s['predicted']} with a prediction.",
                    "", "| steps | with prediction | median error | p90 error | median wall/predicted |",
                    "|---|---|---|---|---|"]
            for key, label in GROUPS:
                g = s["groups"][key]
                ratio = "-" if g["median_ratio"] is None else f"{g['median_ratio']:.3f}"
                out.append(f"| {label} | {g['n']} | {_pct(g['median_abs_err_pct'])} "
                           f"| {_pct(g['p90_abs_err_pct'])} | {ratio} |")
    return out
