"""Markdown tables of simulated runs, with ratios against two baselines and the simulator's stats.

    PYTHONPATH=. .venv/bin/python scripts/sim_prediction_table.py RESULTS.json[.gz] \
        [--bases none,fixed-k4] [--append REPORT.md]

One row per setting and workload: output throughput, mean / p99 end-to-end latency, mean / p99
TTFT, their ratios against each base (throughput: setting / base; latency: base / setting, so
above 1.00x the setting is better either way), and what the record's ``sim`` section says about
the passes: mean requests per step, mean tokens per target pass, the share of target passes
above 256 tokens (past the roofline ridge, ~221 tokens on the H100 profiles), acceptance, drafts
per verification, pipelined steps and early exit's pruned rows.  ``--append`` adds the tables
to a report (the simulator's results.md) under a heading of their own.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

RIDGE_BUCKET = 256  # target passes in buckets above this carry more than 256 tokens


def load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def tables(data: dict, bases: list[str]) -> list[str]:
    results = data["results"]
    by = {(r["setting"], r["workload"]): r for r in results}
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    bases = [b for b in bases if any(r["setting"] == b for r in results)]
    lines = []
    for wl in workloads:
        rows = [r for r in results if r["workload"] == wl]
        rate = rows[0]["rate"]
        lines += [f"Workload `{wl}`, offered {rate:.2f} req/s mean, {rows[0]['num_requests']} requests.", ""]
        head = ["setting", "out tok/s"] + [f"tput vs {b}" for b in bases] + \
            ["mean e2e (s)", "p99 e2e (s)"] + [f"e2e vs {b}" for b in bases] + \
            ["mean TTFT (s)", "p99 TTFT (s)"] + [f"TTFT vs {b}" for b in bases] + \
            ["req/step", "tok/target pass", "passes >256 tok", "accept rate", "drafts/verif.",
             "pipelined steps", "pruned rows"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            m, sim, spec = r["metrics"], r["sim"], r["spec"]
            cells = [r["setting"], f"{m['output_throughput']:.0f}"]
            base_m = {b: by[(b, wl)]["metrics"] for b in bases if (b, wl) in by}
            cells += [_ratio(m["output_throughput"], base_m[b]["output_throughput"]) for b in bases]
            cells += [f"{m['mean_e2e_latency_ms'] / 1e3:.2f}", f"{m['p99_e2e_latency_ms'] / 1e3:.2f}"]
            cells += [_ratio(base_m[b]["mean_e2e_latency_ms"], m["mean_e2e_latency_ms"]) for b in bases]
            cells += [f"{m['mean_ttft_ms'] / 1e3:.2f}", f"{m['p99_ttft_ms'] / 1e3:.2f}"]
            cells += [_ratio(base_m[b]["mean_ttft_ms"], m["mean_ttft_ms"]) for b in bases]
            sizes = sim.get("target_pass_sizes") or {}
            total = sum(sizes.values())
            big = sum(v for k, v in sizes.items() if int(k[2:]) > RIDGE_BUCKET)
            passes = sim["passes"]["target"]
            ee = sim.get("early_exit") or {}
            drafted, verified = spec["spec_drafted_tokens"], spec["spec_verify_steps"]
            cells += [f"{sim['mean_batch_requests']:.1f}" if sim.get("mean_batch_requests") else "-",
                      f"{sim['tokens']['target'] / passes:.0f}" if "tokens" in sim and passes else "-",
                      f"{big / total:.2f}" if total else "-",
                      f"{spec['accept_rate']:.2f}" if spec.get("accept_rate") is not None else "-",
                      f"{drafted / verified:.2f}" if verified else "-",
                      str(spec["spec_pipelined_steps"]),
                      str(ee.get("rows_pruned", "-")) if ee else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        notes = []
        for r in rows:
            fp = (r["sim"] or {}).get("frontier_pipeline")
            if fp:
                notes.append(f"- `{r['setting']}` frontier pipeline: " + (
                    f"choices {fp.get('choices')}, pipelined steps {fp.get('pipelined_steps')}, "
                    f"frontiers {fp.get('frontiers')}" if fp.get("simulated") else fp.get("note", "")))
            busy = (r["sim"] or {}).get("busy_s")
            if busy:
                notes.append(f"- `{r['setting']}` busy: target {busy['target']:.1f} s, draft {busy['draft']:.1f} s "
                             f"of {r['duration_s']:.1f} s")
        lines += notes + [""]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--bases", default="none,fixed-k4")
    p.add_argument("--append", type=Path, help="add the tables to this markdown report")
    args = p.parse_args(argv)
    lines = tables(load(args.results), args.bases.split(","))
    text = "\n".join(lines)
    if args.append:
        report = args.append.read_text().rstrip("\n")
        marker = "## Simulator statistics"
        report = report.split("\n" + marker)[0]
        args.append.write_text(report + f"\n\n{marker} (scripts/sim_prediction_table.py)\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
