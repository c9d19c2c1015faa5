"""Memory and pass times of a scheduler's two ModelRunners (draft, then target with both KV
pools, as managers/scheduler.py builds them for a speculative server), for the question of
where the weights live (issue 24, defect 5).

    PYTHONPATH=. .venv/bin/python scripts/bench_weight_memory.py [--repeats 15] [--share-weights-mmap]

Prints, as JSON: this process's VmRSS / VmHWM (peak) / RssAnon / RssFile after load and after
warm-up; the target's 1-token and 5-token pass times (logits on every row, as a verification
pass) and the draft's 1-token pass, median / min / max over --repeats interleaved repeats; the
machine-wide 1-minute load average around the timed passes (others' work on the cores), the
machine-wide ``workingset_refault_file`` of /proc/vmstat before loading, after loading and after
the timed passes (pages the kernel had evicted from the page cache and read back: weights that
live in the page cache show up here when memory is short); and the linear plan.

Runs on older checkouts too (no --share-weights-mmap there), so that before/after compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def vmstat(key: str = "workingset_refault_file") -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name == key:
            return int(value)
    raise KeyError(key)


def memory_gib() -> dict[str, float]:
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            out[key] = round(int(rest.split()[0]) / 2**20, 2)  # kB -> GiB
    return out


def spread(samples: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in samples]
    return {"median_ms": round(statistics.median(ms), 1), "min_ms": round(min(ms), 1),
            "max_ms": round(max(ms), 1), "n": len(ms)}


def main() -> None:
    from faser_sgl import default_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=default_models.default_target_path())
    parser.add_argument("--draft", default=default_models.default_draft_path())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--context", type=int, default=64, help="tokens already in the KV before the timed passes")
    parser.add_argument("--kv-slots", type=int, default=32768, help="the server's CPU pool (FaserOptions.default_kv_slots)")
    parser.add_argument("--cpu-linear", default="auto")
    parser.add_argument("--share-weights-mmap", action="store_true")
    parser.add_argument("--label", default="")
    args = parser.parse_args()

    from faser_sgl.executor.forward_batch import ForwardBatch
    from faser_sgl.executor.model_runner import ModelRunner
    from faser_sgl.speculative.draft_worker import DraftWorker

    extra = {"share_weights_mmap": True} if args.share_weights_mmap else {}
    refaults = {"before_load": vmstat()}
    start = time.perf_counter()
    draft = DraftWorker.load(args.draft, torch.float32, "cpu", "torch", args.cpu_linear, **extra)
    target = ModelRunner(args.target, dtype=torch.float32, device="cpu", cpu_linear=args.cpu_linear,
                         max_total_tokens=args.kv_slots, draft=draft, **extra)
    load_s = time.perf_counter() - start
    refaults["after_load"] = vmstat()
    after_load = memory_gib()

    slots = target.allocator.alloc(args.context + 5)
    prompt = [(7 * i + 11) % 5000 for i in range(args.context)]

    def batch(q: int) -> ForwardBatch:
        return ForwardBatch.build([[13] * q], [slots[:args.context + q]], [list(range(q))])

    for runner in (target, draft):
        runner.forward(ForwardBatch.build([prompt], [slots[:args.context]], [[args.context - 1]]))
    passes = {"target_1": (target, batch(1)), "target_5": (target, batch(5)), "draft_1": (draft, batch(1))}
    for runner, b in passes.values():  # warm-up
        runner.forward(b)
        runner.forward(b)
    after_warmup = memory_gib()
    refaults["after_warmup"] = vmstat()
    load_before = Path("/proc/loadavg").read_text().split()[0]
    samples: dict[str, list[float]] = {name: [] for name in passes}
    names = list(passes)
    for i in range(args.repeats):
        for name in (names if i % 2 == 0 else names[::-1]):  # interleaved, order alternating
            runner, b = passes[name]
            t0 = time.perf_counter()
            runner.forward(b)
            samples[name].append(time.perf_counter() - t0)
    refaults["after_passes"] = vmstat()
    loadavg = {"before_passes": float(load_before), "after_passes": float(Path("/proc/loadavg").read_text().split()[0])}
    plan = target.linear_plan
    result = {
        "label": args.label, "date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads(),
        "share_weights_mmap": args.share_weights_mmap, "cpu_linear": args.cpu_linear,
        "load_s": round(load_s, 1), "memory_gib_after_load": after_load, "memory_gib_after_warmup": after_warmup,
        "passes": {name: spread(s) for name, s in samples.items()},
        "refaults": refaults, "loadavg_1min": loadavg,
        "refault_pages_load": refaults["after_load"] - refaults["before_load"],
        "refault_pages_passes": refaults["after_passes"] - refaults["after_warmup"],
        "target_plan": None if plan is None else {f"{n}x{k}": (v if isinstance(v, str) else sorted(v))
                                                  for (n, k), v in plan.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
