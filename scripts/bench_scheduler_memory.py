"""Resident memory of a scheduler's process over many rounds of mixed requests, with and without
giving the C heap's free pages back (faser_sgl/managers/heap_trim.py), and with oneDNN's
primitive cache bounded to N primitives (mode ``cap:N``; faser_sgl/executor/onednn_cache.py).

Each mode runs in its own fresh process (the heap is per process) on the same seeded rounds:
prompts of random lengths, random output budgets, and a retraction every few steps (SGLang's
SGLANG_TEST_RETRACT), i.e. the mix of sizes and recomputations a saturated soak sees.  After
each round the process's RSS is read (and, in the trimming mode, the heap trimmed as the idle
scheduler does); the table shows RSS per round and the growth after the warm-up rounds.

    python scripts/bench_scheduler_memory.py --rounds 12 --warmup 3
    python scripts/bench_scheduler_memory.py --modes plain,cap:64,cap:256 --repeats 2

Modes other than ``cap:N`` run with oneDNN's default bound (1024) unless the environment sets
one.  With --repeats the modes run interleaved (plain, cap, ..., plain, cap, ...) so that a slow
phase of the machine does not fall on one mode, and the table shows each repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time


def run_mode(args) -> None:
    import psutil
    import torch

    from faser_sgl import default_models
    from faser_sgl.executor.cpu_dtype import resolve_auto_cpu_dtype
    from faser_sgl.managers.heap_trim import HeapTrimmer
    from faser_sgl.offline_engine import OfflineEngine

    torch.manual_seed(0)
    target = str(default_models.ensure(default_models.TARGET))
    draft = str(default_models.ensure(default_models.DRAFT))
    dtype = resolve_auto_cpu_dtype() if args.dtype == "auto" else getattr(torch, args.dtype)
    engine = OfflineEngine(target, draft, policy=args.policy, num_draft_tokens=4, dtype=dtype,
                           kv_slots=args.kv_slots, max_step_tokens=512,
                           test_retract_interval=args.retract_interval)
    trimmer = HeapTrimmer(enabled=args.mode == "trim")
    rng = random.Random(args.seed)
    process = psutil.Process()
    rows = []
    for round_index in range(args.rounds):
        start = time.monotonic()
        reqs = [engine.make_request([rng.randrange(1000, 30000) for _ in range(rng.randint(16, args.max_prompt))],
                                    rng.randint(4, 32), temperature=0.0)
                for _ in range(args.requests_per_round)]
        engine.run(reqs)
        trimmer.on_idle()  # trims nothing in the plain mode (the trimmer is disabled there)
        rows.append({"round": round_index, "rss_mib": process.memory_info().rss / 2**20,
                     "seconds": time.monotonic() - start, "retractions": engine.planner.num_retractions,
                     "trim_seconds": trimmer.seconds})
        print(json.dumps(rows[-1]), flush=True)
    print("RESULT " + json.dumps({"mode": args.mode, "dtype": str(dtype), "rows": rows}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="rounds before the growth is counted")
    p.add_argument("--requests-per-round", type=int, default=6)
    p.add_argument("--max-prompt", type=int, default=400)
    p.add_argument("--kv-slots", type=int, default=2048)
    p.add_argument("--retract-interval", type=int, default=7)
    p.add_argument("--policy", default="faser")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--modes", default="plain,trim", help="plain, trim, cap:N (comma-separated)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        run_mode(args)
        return
    results = {}
    for repeat in range(args.repeats):
        for mode in args.modes.split(","):
            env = dict(os.environ)
            if mode.startswith("cap:"):
                env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(int(mode[len("cap:"):]))
            cmd = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"mode {mode} failed:\n{out.stderr[-3000:]}")
            name = mode if args.repeats == 1 else f"{mode}#{repeat + 1}"
            results[name] = json.loads(line[len("RESULT "):])
    modes = list(results)
    print(f"dtype {results[modes[0]]['dtype']}, policy {args.policy}, {args.requests_per_round} requests x "
          f"{args.rounds} rounds, seed {args.seed}; RSS MiB after each round")
    print("round | " + " | ".join(f"{m} RSS | {m} s" for m in modes))
    for i in range(args.rounds):
        print(f"{i} | " + " | ".join(f"{results[m]['rows'][i]['rss_mib']:.0f} | {results[m]['rows'][i]['seconds']:.1f}"
                                     for m in modes))
    for m in modes:
        rows = results[m]["rows"]
        base = rows[args.warmup - 1]["rss_mib"]
        end = rows[-1]["rss_mib"]
        peak = max(r["rss_mib"] for r in rows[args.warmup:])
        print(f"{m}: after warm-up {base:.0f} MiB, end {end:.0f} MiB ({(end - base) / base * 100:+.2f}%), "
              f"peak after warm-up {peak:.0f} MiB ({(peak - base) / base * 100:+.2f}%); "
              f"retractions {rows[-1]['retractions']}, trim time {rows[-1]['trim_seconds']:.3f} s, "
              f"run time {sum(r['seconds'] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
