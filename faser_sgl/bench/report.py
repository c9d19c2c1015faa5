"""Turn the harness's result records into results.json, results.csv, PNG plots and a markdown
report that states every setting's gains as ratios against the baseline at each load."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

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


def write_json(path: Path, meta: dict, results: list[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def read_json(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data["meta"], data["results"]


def write_csv(path: Path, results: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "workload", "offered_rate", "num_requests", "failed", "duration_s",
                         *[c for c, _ in CSV_COLUMNS], "spec_drafted_tokens",
                         "spec_accepted_tokens", "spec_accept_rate", "spec_accept_length"])
        for r in results:
            writer.writerow([r["setting"], r["workload"], f"{r['rate']:.4f}", r["num_requests"],
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


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _by_setting(results: list[dict], workload: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        if r["workload"] == workload:
            out.setdefault(r["setting"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["rate"])
    return out


def plot_sweep(path: Path, results: list[dict]) -> bool:
    series = _by_setting(results, "poisson")
    if not series:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, mean_key, p99_key, ylabel, scale) in zip(axes.flat, SWEEP_PANELS):
        for i, (name, rows) in enumerate(series.items()):
            color = f"C{i}"
            rates = [r["rate"] for r in rows]
            ax.plot(rates, [r["metrics"][mean_key] * scale for r in rows], "o-", color=color,
                    label=f"{name} mean" if p99_key else name)
            if p99_key:
                ax.plot(rates, [r["metrics"][p99_key] * scale for r in rows], "s--", color=color,
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


def plot_bursty(path: Path, results: list[dict]) -> str | None:
    """The arrival rate over time and each request's latency by arrival time, per setting."""
    workload = next((w for w in ("bursty", "trace") if _by_setting(results, w)), None)
    if workload is None:
        return None
    series = _by_setting(results, workload)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    first = next(iter(series.values()))[0]
    arrivals = [q["arrival_s"] for q in first["requests"]]
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
    for i, (name, rows) in enumerate(series.items()):
        reqs = [q for q in rows[0]["requests"] if q["success"]]
        bottom.plot([q["arrival_s"] for q in reqs], [q["latency_s"] for q in reqs], "o-",
                    color=f"C{i}", label=name, markersize=3)
    bottom.set_xlabel("arrival time (s)")
    bottom.set_ylabel("end-to-end latency (s)")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return workload


def _identical(row: dict, base: dict | None) -> str:
    if base is None or row is base:
        return "-"
    pairs = [(a, b) for a, b in zip(row["requests"], base["requests"]) if a["success"] and b["success"]]
    return f"{sum(a['text'] == b['text'] for a, b in pairs)}/{len(pairs)}"


def _ratio(value: float, base: float, higher_is_better: bool) -> str:
    if not base or not value:
        return "-"
    return f"{(value / base) if higher_is_better else (base / value):.2f}x"


def _table(rows: list[dict], baseline: dict[tuple, dict], greedy: bool) -> list[str]:
    lines = ["| setting | load (req/s) | done | out tok/s | tput vs base | mean e2e (s) | e2e vs base "
             "| p99 e2e (s) | p99 vs base | mean TTFT (s) | TTFT vs base | p99 TTFT (s) | mean TPOT (ms) "
             "| accept rate | mean accept len | same text as base |",
             "|" + "---|" * 16]
    for r in rows:
        m = r["metrics"]
        base = baseline.get((r["workload"], r["rate"]))
        bm = base["metrics"] if base else {}
        spec = r["spec"]
        lines.append(
            f"| {r['setting']} | {r['rate']:.3g} | {int(m['completed'])}/{r['num_requests']} "
            f"| {m['output_throughput']:.2f} | {_ratio(m['output_throughput'], bm.get('output_throughput'), True)} "
            f"| {m['mean_e2e_latency_ms'] / 1e3:.2f} | {_ratio(m['mean_e2e_latency_ms'], bm.get('mean_e2e_latency_ms'), False)} "
            f"| {m['p99_e2e_latency_ms'] / 1e3:.2f} | {_ratio(m['p99_e2e_latency_ms'], bm.get('p99_e2e_latency_ms'), False)} "
            f"| {m['mean_ttft_ms'] / 1e3:.2f} | {_ratio(m['mean_ttft_ms'], bm.get('mean_ttft_ms'), False)} "
            f"| {m['p99_ttft_ms'] / 1e3:.2f} | {m['mean_tpot_ms']:.0f} "
            f"| {_fmt(spec['accept_rate'], '.2f')} | {_fmt(accept_length(spec), '.2f')} "
            f"| {_identical(r, base) if greedy else 'n/a (sampling)'} |")
    return lines


def headline(results: list[dict], baseline_name: str) -> list[str]:
    """One line per non-baseline setting and workload: its throughput and mean-latency ratios
    against the baseline at the lowest and the highest load."""
    base = {(r["workload"], r["rate"]): r for r in results if r["setting"] == baseline_name}
    lines = []
    for workload in ("poisson", "bursty", "trace"):
        for name, rows in _by_setting(results, workload).items():
            if name == baseline_name:
                continue
            parts = []
            for r in ([rows[0], rows[-1]] if len(rows) > 1 else rows):
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
    return lines


def write_markdown(path: Path, meta: dict, results: list[dict], images: dict[str, Path]) -> None:
    baseline_name = meta["baseline"]
    base = {(r["workload"], r["rate"]): r for r in results if r["setting"] == baseline_name}
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
        f"- Prompts: {meta['dataset']} ({meta['num_prompt_pool']} prompts of at most "
        f"{meta['max_prompt_len']} tokens), up to {meta['output_len']} new tokens each, "
        f"temperature {meta['temperature']}, EOS {'ignored' if meta['ignore_eos'] else 'honoured'}.",
        f"- Baseline for every ratio: `{baseline_name}`. Throughput ratio = setting / baseline; "
        "latency ratio = baseline / setting, so above 1.00x the setting is better either way.",
        "- Accept rate = accepted / drafted tokens; mean accept len = tokens emitted per "
        "verification pass (accepted drafts + the target's own), both from the server's counters "
        "over the run; same text as base = outputs identical to the baseline's.",
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
        rows = sorted((r for r in results if r["workload"] == workload),
                      key=lambda r: (r["rate"], list(meta["settings"]).index(r["setting"])))
        if not rows:
            continue
        out += ["", f"## {title}", ""]
        detail = rows[0]["detail"]
        if workload == "poisson":
            out.append(f"{rows[0]['num_requests']} requests per load; exponential gaps at each rate.")
        elif workload == "bursty":
            out.append(
                f"{rows[0]['num_requests']} requests from a two-state Markov-modulated Poisson process: "
                f"trough {detail['trough_rate']} req/s, peak {detail['peak_ratio']}x that, exponential "
                f"dwell with mean {detail['mean_dwell_s']} s per state; the load column is the "
                "mean offered rate over the run.")
        else:
            out.append(f"Arrivals replayed from `{detail['trace']}`.")
        out += ["", *_table(rows, base, greedy)]
        if workload in rel:
            out += ["", f"![{title}]({rel[workload]})"]
    out += ["", "## Files", "", "- " + ", ".join(f"`{os.path.relpath(p, path.parent)}`"
                                                   for p in meta["files"]), ""]
    path.write_text("\n".join(out))


def write_all(output_dir: Path, report_path: Path, meta: dict, results: list[dict]) -> dict[str, Path]:
    """Write every artefact; return their paths by kind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": output_dir / "results.json", "csv": output_dir / "results.csv"}
    images: dict[str, Path] = {}
    if plot_sweep(output_dir / "poisson_sweep.png", results):
        images["poisson"] = output_dir / "poisson_sweep.png"
    bursty_kind = plot_bursty(output_dir / "bursty.png", results)
    if bursty_kind:
        images[bursty_kind] = output_dir / "bursty.png"
    meta = {**meta, "files": [str(p) for p in [*files.values(), *images.values()]]}
    write_json(files["json"], meta, results)
    write_csv(files["csv"], results)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(report_path, meta, results, images)
    return {**files, **images, "report": report_path}
