"""The soak's outputs: summary.json (everything, machine-readable), report.md (for a person) and
memory.svg (the RSS of each server process over the run; a hand-written SVG so that plotting
needs no dependency)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

COLORS = {"launcher": "#1f77b4", "scheduler": "#d62728", "detokenizer": "#2ca02c"}
OTHER_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def write_outputs(out_dir: Path, summary: dict, rss_samples: list[tuple[float, dict[str, float]]]) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"summary": out_dir / "summary.json", "report": out_dir / "report.md", "memory_plot": out_dir / "memory.svg"}
    summary = {**summary, "files": {name: str(path) for name, path in files.items()}}
    files["summary"].write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    files["report"].write_text(render_markdown(summary))
    windows = summary.get("rss", {}).get("windows_s")
    files["memory_plot"].write_text(render_memory_svg(rss_samples, windows))
    return {name: str(path) for name, path in files.items()}


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(s: dict) -> str:
    verdict = "PASS" if not s["violations"] else f"FAIL ({s['violation_total']} violations)"
    lines = [f"# Soak report: {verdict}", "",
             f"- server: {s['server']['base_url']} (model `{s['server']['model']}`, speculative policy "
             f"`{s['server'].get('speculative_policy')}`, context {s['server']['context_length']}, "
             f"KV pool {s['server']['pool_tokens']}, max running {s['server']['max_running']})",
             f"- seed {s['config']['seed']}, duration {s['config']['duration']} s, max requests "
             f"{s['config']['max_requests']}, concurrency {s['config']['concurrency']}",
             f"- {s['requests_sent']} requests: {s['warmup_s']:.0f} s warm-up, then {s['traffic_s']:.1f} s measured "
             f"(drain included); whole run {s['elapsed_s']:.1f} s",
             ""]
    lines += ["## Violations", ""]
    lines += [f"- {v}" for v in s["violations"]] or ["None."]
    lines += ["", "## Requests by category and outcome", ""]
    outcomes = sorted({o for by in s["counts"].values() for o in by})
    rows = [[cat, sum(by.values()), *[by.get(o, 0) for o in outcomes]] for cat, by in sorted(s["counts"].items())]
    lines += _table(["category", "total", *outcomes], rows)
    lat = s["latency"]
    lines += ["", f"Latency of valid completed requests: p50 {_fmt(lat['p50_s'], '.3f')} s, "
                  f"p99 {_fmt(lat['p99_s'], '.3f')} s over {lat['count']}.", ""]
    lines += _table(["category", "count", "p50 s", "p99 s"],
                    [[c, v["count"], _fmt(v["p50_s"], ".3f"), _fmt(v["p99_s"], ".3f")]
                     for c, v in sorted(lat["by_category"].items())])
    lines += ["", "Variants: " + ", ".join(f"{k} {v}" for k, v in sorted(s["features"].items())), ""]
    lines += ["## Invalid requests by fuzz case", ""]
    cases = [[name, ", ".join(f"{o} {n}" for o, n in sorted(by.items()))]
             for name, by in sorted(s["invalid_cases"].items())]
    lines += _table(["case", "outcomes"], cases) if cases else ["None sent."]
    sched = s["scheduler"]
    lines += ["", "## Scheduler", "",
              f"- retractions during the run: {sched['retractions']}",
              f"- peak running {sched['max_running_seen']}, peak waiting {sched['max_waiting_seen']}, "
              f"peak KV slots in use {sched['max_kv_used_seen']}",
              f"- bursts: {sched['bursts']} of {sched['burst_size']} requests",
              f"- quiescent after traffic: {sched['quiescent']}; final state: kv_used_slots "
              f"{sched['final_state'].get('kv_used_slots')}, kv_free_slots {sched['final_state'].get('kv_free_slots')}"
              f" of {sched['final_state'].get('kv_total_slots')}, running {sched['final_state'].get('num_running_reqs')}"
              f", waiting {sched['final_state'].get('num_waiting_reqs')}",
              f"- injected (allowed) 5xx: {s['injected_5xx']}", ""]
    health, probe = s["health"], s["probe"]
    lines += ["## Health and probe", "",
              f"- /health: {health['polls']} polls, {len(health['failures'])} failures, slowest {health['slowest_s']:.2f} s",
              f"- greedy probe: {probe['checks']} answers, {len(probe['mismatches'])} mismatches, "
              f"{len(probe['errors'])} errors; reference text {probe['reference_text']!r}", ""]
    lines += _rss_section(s["rss"])
    if s.get("server_log_errors"):
        lines += ["", "## Server log: error lines", "", "```", *s["server_log_errors"], "```"]
    return "\n".join(lines) + "\n"


def _rss_section(rss: dict) -> list[str]:
    lines = ["## Resident memory (MiB)", ""]
    if rss.get("note"):
        lines += [rss["note"], ""]
    if rss.get("processes"):
        lines += _table(["process", "pid", "start", "after warm-up", "end (median)", "last", "growth", "limit", "flat"],
                        [[p["role"], p["pid"], _fmt(p.get("start_mib")), _fmt(p.get("warm_mib")),
                          _fmt(p.get("end_mib")), _fmt(p.get("last_mib")), _fmt(p.get("growth_mib")),
                          _fmt(p.get("limit_mib")), "yes" if p["flat"] else "NO"] for p in rss["processes"]])
        lines += ["", "Flat: the median of the last quarter of the measured traffic is within the limit of the "
                  "median of its first quarter (after the warm-up).", "", "![memory](memory.svg)"]
    return lines


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / max(ticks, 1)
    magnitude = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def render_memory_svg(samples: list[tuple[float, dict[str, float]]], windows: dict | None = None,
                      width: int = 800, height: int = 400) -> str:
    """A polyline per process (RSS in MiB against seconds since the soak began), with the warm-up
    and end windows of the flatness check shaded."""
    left, right, top, bottom = 70, 150, 30, 45
    plot_w, plot_h = width - left - right, height - top - bottom
    roles = sorted({role for _, sample in samples for role in sample})
    values = [v for _, sample in samples for v in sample.values()]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="18" font-size="14">Resident memory of the server processes</text>']
    if not values:
        parts += [f'<text x="{left}" y="{top + plot_h / 2}">no RSS samples</text>', "</svg>"]
        return "\n".join(parts) + "\n"
    t_max = max(max(t for t, _ in samples), 1e-9)
    y_low, y_high = min(values), max(values)
    y_step = _nice_step(max(y_high - y_low, 1.0))
    y_low = (y_low // y_step) * y_step
    y_high = max(y_low + y_step, -(-y_high // y_step) * y_step)

    def x_of(t: float) -> float:
        return left + plot_w * t / t_max

    def y_of(v: float) -> float:
        return top + plot_h * (1 - (v - y_low) / (y_high - y_low))

    for name, (start, end) in (windows or {}).items():
        parts.append(f'<rect x="{x_of(start):.1f}" y="{top}" width="{max(x_of(end) - x_of(start), 0):.1f}" '
                     f'height="{plot_h}" fill="#eeeeee"><title>{escape(name)} window</title></rect>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>')
    value = y_low
    while value <= y_high + 1e-9:
        y = y_of(value)
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#dddddd"/>')
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>')
        value += y_step
    t_step = _nice_step(t_max)
    t = 0.0
    while t <= t_max + 1e-9:
        parts.append(f'<text x="{x_of(t):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{t:g}</text>')
        t += t_step
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">seconds</text>')
    parts.append(f'<text x="16" y="{top + plot_h / 2}" transform="rotate(-90 16 {top + plot_h / 2})" '
                 f'text-anchor="middle">RSS (MiB)</text>')
    for i, role in enumerate(roles):
        color = COLORS.get(role, OTHER_COLORS[i % len(OTHER_COLORS)])
        points = " ".join(f"{x_of(t):.1f},{y_of(s[role]):.1f}" for t, s in samples if role in s)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        legend_y = top + 16 + 20 * i
        parts.append(f'<line x1="{left + plot_w + 12}" y1="{legend_y}" x2="{left + plot_w + 32}" '
                     f'y2="{legend_y}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{left + plot_w + 38}" y="{legend_y + 4}">{escape(role)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
