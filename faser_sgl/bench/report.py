"""Turn the harness's result records into results.json, results.csv, PNG plots and a markdown
report that states every setting's gains as ratios against the baseline at each load.

results.json and results.csv keep one record per run (``repeat`` tells the runs of a workload
apart; records written before --repeats have none and count as repeat 0).  The tables and plots
show each (setting, workload, rate)'s mean over its repeats, with the spread of the runs beside
the means a comparison rests on."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from faser_sgl.bench import report_costmodel  # noqa: E402

# (CSV column, key of sglang's BenchmarkMetrics); its latencies are in ms.
CSV_COLUMNS = [
    ("completed", "completed"), ("output_tok_per_s", "output_throughput"),
    ("request_per_s", "request_throughput"),
    ("mean_e2e_ms", "mean_e2e_latency_ms"), ("p99_e2e_ms", "p99_e2e_latency_ms"),
    ("mean_ttft_ms", "mean_ttft_ms"), ("p99_ttft_ms", "p99_ttft_ms"),
    ("mean_tpot_ms", "mean_tpot_ms"), ("p99_tpot_ms", "p99_tpot_ms"),
    ("mean_itl_ms", "mean_itl_ms"), ("total_output_tokens", "total_output"),
]
SWEEP_PANELS = [  # (title, mean key, p99 key or None, y label, scale of the stored value)
    ("End-to-end latency", "mean_e2e_latency_ms", "p99_e2e_latency_ms", "seconds", 1e-3),
    ("Time to first token", "mean_ttft_ms", "p99_ttft_ms", "seconds", 1e-3),
    ("Time per output token", "mean_tpot_ms", "p99_tpot_ms", "milliseconds", 1.0),
    ("Output throughput", "output_throughput", None, "tokens / s", 1.0),
]


# The metrics whose spread over repeats the tables show and the sweep plot draws as bars.
SPREAD_KEYS = ("output_throughput", "mean_e2e_latency_ms")


def write_json(path: Path, meta: dict, results: list[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def read_json(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data["meta"], data["results"]


def write_csv(path: Path, results: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "workload", "offered_rate", "repeat", "num_requests", "failed", "duration_s",
                         *[c for c, _ in CSV_COLUMNS], "spec_drafted_tokens",
                         "spec_accepted_tokens", "spec_accept_rate", "spec_accept_length"])
        for r in results:
            writer.writerow([r["setting"], r["workload"], f"{r['rate']:.4f}", repeat_of(r), r["num_requests"],
                             r["failed"], f"{r['duration_s']:.2f}",
                             *[f"{r['metrics'][k]:.3f}" for _, k in CSV_COLUMNS],
                             r["spec"]["spec_drafted_tokens"], r["spec"]["spec_accepted_tokens"],
                             _fmt(r["spec"]["accept_rate"], ".3f", ""),
                             _fmt(accept_length(r["spec"]), ".3f", "")])


def accept_length(spec: dict) -> float | None:
    """Tokens emitted per verification pass over the run (accepted drafts + the target's own
    token), from the server's counters: weighted by passes, and blind to plain decode steps."""
    steps = spec.get("spec_verify_steps") or 0
    return (spec["spec_accepted_tokens"] + steps) / steps if steps else None


def repeat_of(record: dict) -> int:
    return record.get("repeat", 0)


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (setting, workload, rate), in the order first seen: every metric the mean over
    its runs, the speculation counters summed (so the accept rate is pooled over the runs), the
    min and max of SPREAD_KEYS, and the runs themselves (by repeat) for the text comparison."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["setting"], r["workload"], r["rate"]), []).append(r)
    rows = []
    for (setting, workload, rate), runs in groups.items():
        runs = sorted(runs, key=repeat_of)
        metrics = {k: float(np.mean([r["metrics"][k] for r in runs])) for k in runs[0]["metrics"]}
        counters = [k for k in runs[0]["spec"] if k != "accept_rate"]
        spec = {k: sum(r["spec"].get(k) or 0 for r in runs) for k in counters}
        drafted = spec.get("spec_drafted_tokens")
        spec["accept_rate"] = spec["spec_accepted_tokens"] / drafted if drafted else None
        rows.append({
            "setting": setting, "workload": workload, "rate": rate, "runs": runs,
            "num_requests": runs[0]["num_requests"], "detail": runs[0]["detail"],
            "completed": sum(int(r["metrics"]["completed"]) for r in runs),
            "requested": sum(r["num_requests"] for r in runs),
            "metrics": metrics, "spec": spec,
            "spread": {k: (min(r["metrics"][k] for r in runs), max(r["metrics"][k] for r in runs))
                       for k in SPREAD_KEYS},
        })
    return rows


def num_repeats(meta: dict, results: list[dict]) -> int:
    return meta.get("repeats") or max((repeat_of(r) + 1 for r in results), default=1)


def spread(row: dict, key: str, scale: float = 1.0, spec: str = ".2f") -> str:
    """'min-max (relative spread %)' of a metric over the row's runs; '-' for a single run."""
    if len(row["runs"]) < 2:
        return "-"
    lo, hi = row["spread"][key]
    mean = row["metrics"][key]
    rel = f" ({(hi - lo) / mean * 100:.1f}%)" if mean else ""
    return f"{lo * scale:{spec}}-{hi * scale:{spec}}{rel}"


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _by_setting(rows: list[dict], workload: str) -> dict[str, list[dict]]:
    """Aggregated rows of one workload by setting, each setting's by rate."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["workload"] == workload:
            out.setdefault(r["setting"], []).append(r)
    for series in out.values():
        series.sort(key=lambda r: r["rate"])
    return out


def plot_sweep(path: Path, rows: list[dict]) -> bool:
    """The Poisson sweep's means by offered load; bars span the runs' min-max where repeated."""
    series = _by_setting(rows, "poisson")
    if not series:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, mean_key, p99_key, ylabel, scale) in zip(axes.flat, SWEEP_PANELS):
        for i, (name, points) in enumerate(series.items()):
            color = f"C{i}"
            rates = [r["rate"] for r in points]
            means = np.array([r["metrics"][mean_key] * scale for r in points])
            yerr = None
            if mean_key in SPREAD_KEYS and any(len(r["runs"]) > 1 for r in points):
                lo = np.array([r["spread"][mean_key][0] * scale for r in points])
                hi = np.array([r["spread"][mean_key][1] * scale for r in points])
                yerr = [means - lo, hi - means]
            ax.errorbar(rates, means, yerr=yerr, fmt="o-", color=color, capsize=3,
                        label=f"{name} mean" if p99_key else name)
            if p99_key:
                ax.plot(rates, [r["metrics"][p99_key] * scale for r in points], "s--", color=color,
                        alpha=0.7, label=f"{name} p99")
        ax.set_title(title)
        ax.set_xlabel("offered load (requests / s, Poisson)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _mean_latency_by_request(runs: list[dict]) -> tuple[list[float], list[float]]:
    """(arrival, mean latency over the runs it succeeded in) per request: the arrivals are the
    same in every run, so request i of each run is the same request."""
    xs, ys = [], []
    for i, request in enumerate(runs[0]["requests"]):
        done = [run["requests"][i]["latency_s"] for run in runs if run["requests"][i]["success"]]
        if done:
            xs.append(request["arrival_s"])
            ys.append(float(np.mean(done)))
    return xs, ys


def plot_bursty(path: Path, rows: list[dict], workload: str = "bursty") -> bool:
    """The arrival rate over time and each request's latency by arrival time, per setting, for
    the bursty or the trace workload."""
    series = _by_setting(rows, workload)
    if not series:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    first = next(iter(series.values()))[0]
    arrivals = [q["arrival_s"] for q in first["runs"][0]["requests"]]
    periods = first["detail"].get("periods")
    if periods:
        xs, ys = [], []
        for start, end, rate in periods:
            xs += [start, end]
            ys += [rate, rate]
        top.plot(xs, ys, color="k", label="MMPP rate")
    top.plot(arrivals, [0] * len(arrivals), "|", color="C3", markersize=12, label="arrivals")
    top.set_ylabel("offered requests / s")
    top.set_title(f"{workload} arrivals")
    top.legend(fontsize=7)
    for i, (name, points) in enumerate(series.items()):
        runs = points[0]["runs"]
        xs, ys = _mean_latency_by_request(runs)
        label = name if len(runs) == 1 else f"{name} (mean of {len(runs)} runs)"
        bottom.plot(xs, ys, "o-", color=f"C{i}", label=label, markersize=3)
    bottom.set_xlabel("arrival time (s)")
    bottom.set_ylabel("end-to-end latency (s)")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _identical(row: dict, base: dict | None) -> str:
    """Successful requests whose text equals the baseline's repeat 0, over all of the row's runs
    (for the baseline itself: its later repeats against its first)."""
    if base is None:
        return "-"
    reference = base["runs"][0]
    runs = row["runs"][1:] if row is base else row["runs"]
    if not runs:
        return "-"
    pairs = [(a, b) for run in runs for a, b in zip(run["requests"], reference["requests"])
             if a["success"] and b["success"]]
    return f"{sum(a['text'] == b['text'] for a, b in pairs)}/{len(pairs)}"


def _ratio(value: float, base: float, higher_is_better: bool) -> str:
    if not base or not value:
        return "-"
    return f"{(value / base) if higher_is_better else (base / value):.2f}x"


def _table(rows: list[dict], baseline: dict[tuple, dict], greedy: bool, spreads: bool) -> list[str]:
    """Aggregated rows as a markdown table; with ``spreads``, the min-max of the runs beside the
    throughput and mean latency ratios."""
    def cells(r: dict) -> list[tuple[str, str]]:
        m = r["metrics"]
        base = baseline.get((r["workload"], r["rate"]))
        bm = base["metrics"] if base else {}
        spec = r["spec"]
        cols = [
            ("setting", r["setting"]), ("load (req/s)", f"{r['rate']:.3g}"),
            ("done", f"{r['completed']}/{r['requested']}"),
            ("out tok/s", f"{m['output_throughput']:.2f}"),
            ("tput vs base", _ratio(m["output_throughput"], bm.get("output_throughput"), True)),
            ("tput spread", spread(r, "output_throughput")),
            ("mean e2e (s)", f"{m['mean_e2e_latency_ms'] / 1e3:.2f}"),
            ("e2e vs base", _ratio(m["mean_e2e_latency_ms"], bm.get("mean_e2e_latency_ms"), False)),
            ("e2e spread (s)", spread(r, "mean_e2e_latency_ms", 1e-3)),
            ("p99 e2e (s)", f"{m['p99_e2e_latency_ms'] / 1e3:.2f}"),
            ("p99 vs base", _ratio(m["p99_e2e_latency_ms"], bm.get("p99_e2e_latency_ms"), False)),
            ("mean TTFT (s)", f"{m['mean_ttft_ms'] / 1e3:.2f}"),
            ("TTFT vs base", _ratio(m["mean_ttft_ms"], bm.get("mean_ttft_ms"), False)),
            ("p99 TTFT (s)", f"{m['p99_ttft_ms'] / 1e3:.2f}"), ("mean TPOT (ms)", f"{m['mean_tpot_ms']:.0f}"),
            ("accept rate", _fmt(spec["accept_rate"], ".2f")),
            ("mean accept len", _fmt(accept_length(spec), ".2f")),
            ("same text as base", _identical(r, base) if greedy else "n/a (sampling)"),
        ]
        return [c for c in cols if spreads or "spread" not in c[0]]

    table = [cells(r) for r in rows]
    header = [name for name, _ in table[0]]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(value for _, value in row) + " |" for row in table]]


def headline(results: list[dict], baseline_name: str) -> list[str]:
    """One line per non-baseline setting and workload: its throughput and mean-latency ratios
    (of the means over repeats) against the baseline at the lowest and the highest load."""
    rows = aggregate(results)
    base = {(r["workload"], r["rate"]): r for r in rows if r["setting"] == baseline_name}
    lines = []
    for workload in ("poisson", "bursty", "trace"):
        for name, points in _by_setting(rows, workload).items():
            if name == baseline_name:
                continue
            parts = []
            for r in ([points[0], points[-1]] if len(points) > 1 else points):
                b = base.get((workload, r["rate"]))
                if b is None:
                    continue
                parts.append(
                    f"at {r['rate']:.3g} req/s: throughput "
                    f"{_ratio(r['metrics']['output_throughput'], b['metrics']['output_throughput'], True)}, "
                    f"mean latency {_ratio(r['metrics']['mean_e2e_latency_ms'], b['metrics']['mean_e2e_latency_ms'], False)}, "
                    f"p99 latency {_ratio(r['metrics']['p99_e2e_latency_ms'], b['metrics']['p99_e2e_latency_ms'], False)}, "
                    f"mean TTFT {_ratio(r['metrics']['mean_ttft_ms'], b['metrics']['mean_ttft_ms'], False)}")
            if parts:
                lines.append(f"- **{name}** vs {baseline_name}, {workload}: " + "; ".join(parts) + ".")
    if lines:
        lines.append("- (Latency ratios are baseline / setting: above 1.00x the setting answers faster.)")
        repeats = max(len(r["runs"]) for r in rows)
        if repeats > 1:
            lines.append(f"- (Ratios of the means over {repeats} repeats; the tables give each mean's spread.)")
    return lines


def _repeats_text(repeats: int, interleaved: bool = False) -> str:
    if repeats == 1:
        return ("- Each workload ran once per setting; prompts and arrival times are identical "
                "across settings.")
    order = ("settings interleaved in time: each repeat started every setting's server in turn and "
             "ran all workloads on it, so that a drift of the machine's speed spreads over all "
             "settings" if interleaved else
             "on each setting's server (all workloads once, then again)")
    return (f"- Repeats: every workload ran {repeats} times, {order}, with identical prompts and "
            "arrival times across repeats and settings. The tables show the mean over the repeats "
            "and ratios of those means; a spread column gives the runs' min-max and (max - min) / mean.")


def write_markdown(path: Path, meta: dict, results: list[dict], images: dict[str, Path]) -> None:
    baseline_name = meta["baseline"]
    rows = aggregate(results)
    repeats = num_repeats(meta, results)
    base = {(r["workload"], r["rate"]): r for r in rows if r["setting"] == baseline_name}
    greedy = meta["temperature"] == 0
    rel = {k: os.path.relpath(v, path.parent) for k, v in images.items()}
    out = [
        "# Load-test results",
        "",
        "Generated by `python -m faser_sgl.bench` (faser_sgl/bench/); do not edit by hand.",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}",
        f"- Command: `{meta['command']}`",
        *[f"- Rerun of `{name}`: {rerun['date']}, `{rerun['command']}` ({rerun['why']})"
          for name, rerun in meta.get("reruns", {}).items()],
        f"- Prompts: {meta['dataset']} ({meta['num_prompt_pool']} prompts of at most "
        f"{meta['max_prompt_len']} tokens), up to {meta['output_len']} new tokens each, "
        f"temperature {meta['temperature']}, EOS {'ignored' if meta['ignore_eos'] else 'honoured'}.",
        _repeats_text(repeats, bool(meta.get("interleave"))),
        f"- Baseline for every ratio: `{baseline_name}`. Throughput ratio = setting / baseline; "
        "latency ratio = baseline / setting, so above 1.00x the setting is better either way.",
        "- Accept rate = accepted / drafted tokens; mean accept len = tokens emitted per "
        "verification pass (accepted drafts + the target's own), both from the server's counters "
        "over the run" + ("s" if repeats > 1 else "") + "; same text as base = outputs identical to the "
        "baseline's" + (" first run, counted over all runs (the baseline's own row: its later runs)"
                        if repeats > 1 else "") + ".",
        "",
        "## Settings (server arguments)",
        "",
        "| setting | arguments |",
        "|---|---|",
        *[f"| {name} | `{args or '(defaults)'}` |" for name, args in meta["settings"].items()],
        "",
        "## Headline",
        "",
        *(headline(results, baseline_name) or ["- (only the baseline ran)"]),
    ]
    for workload, title in (("poisson", "Poisson sweep"), ("bursty", "Bursty traffic (MMPP)"),
                            ("trace", "Recorded trace")):
        table_rows = sorted((r for r in rows if r["workload"] == workload),
                            key=lambda r: (r["rate"], list(meta["settings"]).index(r["setting"])))
        if not table_rows:
            continue
        out += ["", f"## {title}", ""]
        detail = table_rows[0]["detail"]
        if workload == "poisson":
            out.append(f"{table_rows[0]['num_requests']} requests per load; exponential gaps at each rate.")
        elif workload == "bursty":
            out.append(
                f"{table_rows[0]['num_requests']} requests from a two-state Markov-modulated Poisson process: "
                f"trough {detail['trough_rate']} req/s, peak {detail['peak_ratio']}x that, exponential "
                f"dwell with mean {detail['mean_dwell_s']} s per state; the load column is the "
                "mean offered rate over the run.")
        else:
            out.append(f"Arrivals replayed from `{detail['trace']}`.")
        if repeats > 1:
            out[-1] += f" Done = completed / sent over all {repeats} repeats."
        out += ["", *_table(table_rows, base, greedy, repeats > 1)]
        if workload in rel:
            out += ["", f"![{title}]({rel[workload]})"]
    out += early_exit_section(rows)
    out += report_costmodel.markdown(meta)
    out += ["", "## Files", "", "- " + ", ".join(f"`{os.path.relpath(p, path.parent)}`"
                                                   for p in meta["files"]), ""]
    path.write_text("\n".join(out))


def early_exit_section(rows: list[dict]) -> list[str]:
    """What early exit did in each run of the settings that have it (the servers' counters,
    summed over the repeats): drafting steps whose drafts it scored, those it left unscored
    because no prune could pay, the probes among the scored, and the draft rows it pruned."""
    rows = [r for r in rows if r["spec"].get("exit_scored_steps") or r["spec"].get("exit_unscored_steps")]
    if not rows:
        return []
    out = ["", "## Early exit", "",
           "Drafting steps whose drafts were scored at the exit layers, left unscored (no prune could "
           "save what scoring costs: `EarlyExitVerifier.worth_scoring`), scored only as a probe, and "
           "the draft rows pruned of those that entered a scored pass; summed over the repeats.", "",
           "| setting | workload | load (req/s) | scored steps | unscored steps | probes | draft rows scored | rows pruned |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spec = r["spec"]
        out.append(f"| {r['setting']} | {r['workload']} | {r['rate']:.3g} | {spec.get('exit_scored_steps', 0)} | "
                   f"{spec.get('exit_unscored_steps', 0)} | {spec.get('exit_probe_steps', 0)} | "
                   f"{spec.get('exit_draft_rows', 0)} | {spec.get('exit_rows_pruned', 0)} |")
    return out


def write_all(output_dir: Path, report_path: Path, meta: dict, results: list[dict]) -> dict[str, Path]:
    """Write every artefact; return their paths by kind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": output_dir / "results.json", "csv": output_dir / "results.csv"}
    rows = aggregate(results)
    images: dict[str, Path] = {}
    if plot_sweep(output_dir / "poisson_sweep.png", rows):
        images["poisson"] = output_dir / "poisson_sweep.png"
    for workload, name in (("bursty", "bursty.png"), ("trace", "trace.png")):
        if plot_bursty(output_dir / name, rows, workload):
            images[workload] = output_dir / name
    meta = {**meta, "files": [str(p) for p in [*files.values(), *images.values()]]}
    write_json(files["json"], meta, results)
    write_csv(files["csv"], results)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(report_path, meta, results, images)
    return {**files, **images, "report": report_path}
