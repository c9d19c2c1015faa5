"""Measure this machine's forward-pass costs of the embedded pair as a simulator cost profile.

    PYTHONPATH=. .venv/bin/python scripts/measure_cost_profile.py --out docs/sim_validation/cpu_profile.json

The simulator (python -m faser_sgl.sim --cost-profile FILE) prices a pass by the tokens it
carries.  This times the passes the server runs, with the server's executor settings (float32,
this CPU's linear path, --faser-num-threads): target passes of n rows with logits on every row
(a verification or a batch of decodes) for small n and prefill chunks (logits on the last row)
for large n; draft passes of n one-token requests (a draft step) for small n and prefill chunks
(the draft catching up on a prompt) for large n.  Medians of --repeats passes after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from faser_sgl import default_models
from faser_sgl.bench.cli import describe_machine
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.model_runner import ModelRunner

ROW_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)  # decode/verification-shaped passes
CHUNK_SIZES = (32, 64, 128, 256, 512)  # prefill-shaped passes
CONTEXT = 256  # cached tokens before each small pass (a typical prompt + output here)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: one-time costs are not what a step costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure(runner: ModelRunner, one_request_rows: bool, repeats: int) -> list[list[float]]:
    """[[tokens, ms], ...]: rows as one request (target: a verification) or as that many
    one-token requests (draft: a draft step), then prefill chunks."""
    slots = runner.allocator.alloc(CONTEXT * 16 + max(CHUNK_SIZES))
    points = []
    for n in ROW_SIZES:
        if one_request_rows:
            batch = ForwardBatch.build([[1] * n], [slots[:CONTEXT + n]], [list(range(n))])
        else:
            per = [slots[i * (CONTEXT + 1):(i + 1) * (CONTEXT + 1)] for i in range(n)]
            batch = ForwardBatch.build([[1]] * n, per, [[0]] * n)
        points.append([n, 1e3 * timed(lambda: runner.forward(batch), repeats)])
    for n in CHUNK_SIZES:
        batch = ForwardBatch.build([[1] * n], [slots[:n]], [[n - 1]])
        points.append([n, 1e3 * timed(lambda: runner.forward(batch), repeats)])
    runner.allocator.free(slots)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", default=None, help="target model dir (default: the embedded one)")
    parser.add_argument("--draft", default=None, help="draft model dir (default: the embedded one)")
    parser.add_argument("--cpu-linear", choices=["auto", "off"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target_path = args.target or default_models.default_target_path()
    draft_path = args.draft or default_models.default_draft_path()
    started = time.time()
    curves = {}
    for name, path, one_request in (("target", target_path, True), ("draft", draft_path, False)):
        runner = ModelRunner(path, dtype=torch.float32, device="cpu", attention_backend="torch",
                             max_total_tokens=8192, cpu_linear=args.cpu_linear)
        curves[name] = measure(runner, one_request, args.repeats)
        print(f"{name}: " + ", ".join(f"{n}:{ms:.0f}" for n, ms in curves[name]), flush=True)
        del runner
    profile = {
        "name": f"measured-{platform.node() or 'cpu'}",
        "machine": describe_machine(),
        "units": "ms",
        "target": {"points": curves["target"]},
        "draft": {"points": curves["draft"]},
        "sources": {
            "command": "PYTHONPATH=. .venv/bin/python scripts/measure_cost_profile.py "
                       f"--out {args.out} --cpu-linear {args.cpu_linear} --threads {args.threads} "
                       f"--repeats {args.repeats}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "target": f"{target_path}: {ROW_SIZES} rows of one request after {CONTEXT} cached "
                      f"tokens, logits on every row; prefill chunks {CHUNK_SIZES}, logits on the last",
            "draft": f"{draft_path}: {ROW_SIZES} one-token requests after {CONTEXT} cached tokens "
                     f"each; prefill chunks {CHUNK_SIZES}, logits on the last",
            "threads": torch.get_num_threads(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile, indent=1) + "\n")
    print(f"wrote {args.out} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
