"""What would FASER's frontier controller choose on other hardware?  The same code the server runs
(speculative/frontier.FrontierController), fed with pass costs instead of measuring them.

    python scripts/frontier_whatif.py [--rates 0.6 0.8 0.9] [--batch 1] [--max-k 6]

Two parts:
1. Measured machines: pass costs per rows from a bench_speculative run's cost table (this VM) or
   from the issue's AMD EPYC measurement (one-row passes, 2 cores, float32).
2. A map: the target pass costs 1 (flat: a memory-bound small batch), a draft pass costs ``d``
   of it, and each side runs ``s`` times slower while the other side runs.  For each (d, s) the
   controller's choice at batch 1 and the predicted tokens/s against the best serial step.
Costs are flat in the row count below 8 rows here (a memory-bound pass), which is what both the
GPU at small batch and the measured CPUs show to within a few percent.
"""

from __future__ import annotations

import argparse

from faser_sgl.speculative.adaptive import CostCurve, expected_tokens
from faser_sgl.speculative.frontier import FrontierController, _Mode

# Per-pass milliseconds: {rows: ms}: scripts/bench_speculative.py's cost table on the Intel Xeon
# VM (threads, docs/benchmarks.md, issue 11 section), scripts/bench_core_split.py's process split
# on the same VM, and the AMD EPYC figures (1-row passes).  A single point is a flat
# curve (CostCurve extrapolates with its prior slope, 0 here).
MACHINES = {
    "Intel Xeon VM (measured, 2 cores)": {
        "target": {1: 299, 2: 318, 3: 356, 4: 362, 5: 370}, "draft": {1: 101, 2: 107, 4: 157, 8: 163},
        "split_target": {1: 506, 2: 532, 3: 584, 4: 611, 5: 633}, "split_draft": {1: 167, 2: 174, 4: 217, 8: 246}},
    "Intel Xeon VM, draft in its own process (bench_core_split, 3-row target passes)": {
        "target": {3: 322}, "draft": {1: 98}, "split_target": {3: 487}, "split_draft": {1: 146}},
    "AMD EPYC (issue 11's measurement, 2 cores)": {
        "target": {1: 341}, "draft": {1: 140}, "split_target": {1: 439}, "split_draft": {1: 172}},
}


class _Split:
    name = "split"


class _Generator:
    def __init__(self, target: dict, draft: dict, rate: float):
        self.pass_costs = {"target": _curve(target), "draft": _curve(draft)}
        self.rate = rate

    def _accept_rate(self, req) -> float:
        return self.rate


def _curve(points: dict[int, float]) -> CostCurve:
    curve = CostCurve(0.0, 0.0)
    for rows, ms in points.items():
        curve.observe(rows, ms / 1000)
    return curve


def controller_for(costs: dict, rate: float) -> FrontierController:
    split = _Split()
    controller = FrontierController(_Generator(costs["target"], costs["draft"], rate), [split])
    for rows, ms in costs["split_target"].items():
        controller.observe(split, "target", rows, ms / 1000)
    for rows, ms in costs["split_draft"].items():
        controller.observe(split, "draft", rows, ms / 1000)
    return controller


def best_serial(controller: FrontierController, rate: float, batch: int, max_k: int) -> tuple[int, float]:
    best = max(range(max_k + 1), key=lambda k: batch * expected_tokens(rate, k) /
               controller.predict([k] * batch, [rate] * batch, _Mode()))
    return best, batch * expected_tokens(rate, best) / controller.predict([best] * batch, [rate] * batch, _Mode())


def choose(controller: FrontierController, rate: float, batch: int, max_k: int):
    serial_k, _ = best_serial(controller, rate, batch, max_k)
    lengths, mode = controller.choose([object()] * batch, [serial_k] * batch, [max_k] * batch)
    tokens = sum(expected_tokens(rate, k) for k in lengths)
    return lengths, mode, tokens / controller.predict(lengths, [rate] * batch, mode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.6, 0.8, 0.9])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-k", type=int, default=6)
    args = ap.parse_args()

    print(f"## Measured machines (batch {args.batch}, K <= {args.max_k})\n")
    print("| machine | acceptance | best serial | controller's choice | predicted tokens/s vs best serial |")
    print("|---|---|---|---|---|")
    for name, costs in MACHINES.items():
        for rate in args.rates:
            controller = controller_for(costs, rate)
            k, serial_rate = best_serial(controller, rate, args.batch, args.max_k)
            lengths, mode, rate_chosen = choose(controller, rate, args.batch, args.max_k)
            print(f"| {name} | {rate} | K={k} | K={max(lengths)}, {mode.label} | {rate_chosen / serial_rate:.2f}x |")

    draft_ratios = [0.1, 0.2, 0.3, 0.5, 0.7]
    slowdowns = [1.0, 1.1, 1.25, 1.5, 1.7]
    for rate in args.rates:
        print(f"\n## Map at acceptance {rate} (batch {args.batch}): choice and tokens/s vs best serial\n")
        print("| draft / target pass | " + " | ".join(f"split slowdown {s}x" for s in slowdowns) + " |")
        print("|---|" + "---|" * len(slowdowns))
        for d in draft_ratios:
            cells = []
            for s in slowdowns:
                costs = {"target": {1: 100.0}, "draft": {1: 100.0 * d},
                         "split_target": {1: 100.0 * s}, "split_draft": {1: 100.0 * d * s}}
                controller = controller_for(costs, rate)
                _, serial_rate = best_serial(controller, rate, args.batch, args.max_k)
                lengths, mode, chosen = choose(controller, rate, args.batch, args.max_k)
                label = "serial" if mode.split is None else f"K={max(lengths)} F={mode.size}"
                cells.append(f"{label} {chosen / serial_rate:.2f}x")
            print(f"| {d} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
