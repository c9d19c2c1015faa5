"""Real load-harness run vs the simulator's replay of it: throughput and latency side by side.

    PYTHONPATH=. .venv/bin/python scripts/compare_sim_real.py REAL/results.json SIM/results.json \
        [--tolerance 0.15] [--real-repeat REAL2/results.json]

Prints a markdown table per setting and workload (output tokens/s, mean end-to-end latency,
mean TTFT): real, simulated, and the simulated/real ratio, marking ratios outside 1 +- tolerance.
Exit status 1 when a throughput or mean-latency ratio is outside it.  ``--real-repeat``: a second
real run of the same requests; its ratios to the first (throughput, mean e2e) are shown beside,
as the yardstick of how far two real runs differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = (("output_throughput", "out tok/s", 1.0), ("mean_e2e_latency_ms", "mean e2e (s)", 1e-3),
           ("mean_ttft_ms", "mean TTFT (s)", 1e-3))
CHECKED = ("output_throughput", "mean_e2e_latency_ms")  # what the 15% goal is about


def key(result: dict) -> tuple:
    return result["setting"], result["workload"], round(float(result["rate"]), 4)


def compare(real_path: Path, sim_path: Path, tolerance: float,
            repeat_path: Path | None = None) -> tuple[list[str], bool]:
    real = {key(r): r for r in json.loads(real_path.read_text())["results"]}
    sim = {key(r): r for r in json.loads(sim_path.read_text())["results"]}
    repeat = {key(r): r for r in json.loads(repeat_path.read_text())["results"]} if repeat_path else {}
    header = ["setting", "workload", "load (req/s)"]
    for _, label, _ in METRICS:
        header += [f"real {label}", f"sim {label}", "sim/real"]
    if repeat_path:
        header += ["real repeat/real: tok/s", "mean e2e"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ok = True
    for k in real:
        if k not in sim:
            continue
        row = [k[0], k[1], f"{k[2]:g}"]
        for name, _, scale in METRICS:
            a, b = real[k]["metrics"][name], sim[k]["metrics"][name]
            ratio = b / a if a else float("nan")
            outside = not (1 - tolerance <= ratio <= 1 + tolerance)
            if outside and name in CHECKED:
                ok = False
            row += [f"{a * scale:.2f}", f"{b * scale:.2f}", f"{'**' if outside else ''}{ratio:.2f}{'**' if outside else ''}"]
        if repeat_path:
            other = repeat.get(k)
            row += [f"{other['metrics'][name] / real[k]['metrics'][name]:.2f}" if other else "-" for name in CHECKED]
        lines.append("| " + " | ".join(row) + " |")
    return lines, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real", type=Path)
    parser.add_argument("sim", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--real-repeat", type=Path, default=None)
    args = parser.parse_args()
    lines, ok = compare(args.real, args.sim, args.tolerance, args.real_repeat)
    print("\n".join(lines))
    print(f"\nthroughput and mean e2e within {args.tolerance:.0%} everywhere: {'yes' if ok else 'no'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
