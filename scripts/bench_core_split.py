"""Can the draft and the target model run at the same time on disjoint CPU cores, and does it pay?
(Groundwork for FASER's frontier pipeline, issue 11.)

    python scripts/bench_core_split.py [--context 256] [--passes 12] [--verify-rows 3]

Measured on the embedded pair (float32, this machine's CPU linear path), per pass, in ms:
1. in turn, each model alone with every core, then with one pinned core each;
2. at the same time, target pinned to core 0 and draft to core 1:
   - "threads": both models in this process, each driven by its own Python thread that pins
     itself (os.sched_setaffinity on its thread id) and uses one intra-op thread;
   - "processes": the draft model in a child process pinned to core 1 with one thread, the
     target in this process pinned to core 0.
   The target runs verification passes of ``--verify-rows`` rows, the draft one-row passes, as a
   pipeline would overlap them.  Reported: each model's time per pass while the other runs, and
   the work rate: (target passes + draft passes / draft_per_target) per second against running
   the same passes in turn on all cores.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import threading
import time

import torch

from faser_sgl import default_models
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.model_runner import ModelRunner


def load(path: str) -> ModelRunner:
    return ModelRunner(path, dtype=torch.float32, device="cpu", attention_backend="torch",
                       max_total_tokens=4096)


def make_pass(runner: ModelRunner, context: int, rows: int):
    """A pass of ``rows`` new tokens after ``context`` cached ones (KV contents do not matter
    for timing), with logits on every row as a verification has."""
    slots = runner.allocator.alloc(context + rows)
    batch = ForwardBatch.build([[1] * rows], [slots], [list(range(rows))])

    @torch.inference_mode()
    def run() -> float:
        start = time.perf_counter()
        runner.forward(batch)
        return time.perf_counter() - start
    return run


def pin(core: int | None, threads: int) -> None:
    """Pin the calling thread (Linux: a thread id is a pid for sched_setaffinity)."""
    if core is not None:
        os.sched_setaffinity(threading.get_native_id(), {core})
    torch.set_num_threads(threads)


def timed_passes(run, n: int) -> list[float]:
    run()  # warm-up
    return [run() for _ in range(n)]


def ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def draft_process(path: str, context: int, core: int, n: int, start_evt, out_q) -> None:
    pin(core, 1)
    run = make_pass(load(path), context, 1)
    run()
    out_q.put("ready")
    start_evt.wait()
    out_q.put(timed_passes(run, n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--passes", type=int, default=12)
    ap.add_argument("--verify-rows", type=int, default=3)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs at least two cores")
    target_path, draft_path = default_models.default_target_path(), default_models.default_draft_path()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"# core split on {platform.node()} ({cpu}), cores {cores}, float32, context {args.context}, "
          f"target passes of {args.verify_rows} rows, draft passes of 1 row\n")
    target, draft = load(target_path), load(draft_path)
    run_target = make_pass(target, args.context, args.verify_rows)
    run_draft = make_pass(draft, args.context, 1)
    n = args.passes
    everything = set(cores)

    # 1. In turn.
    os.sched_setaffinity(0, everything)
    torch.set_num_threads(len(cores))
    t_all, d_all = ms(timed_passes(run_target, n)), ms(timed_passes(run_draft, n))
    pin(cores[0], 1)
    t_one, d_one = ms(timed_passes(run_target, n)), ms(timed_passes(run_draft, n))
    print("| mode | target ms/pass | draft ms/pass |")
    print("|---|---|---|")
    print(f"| alone, {len(cores)} threads | {t_all:.0f} | {d_all:.0f} |")
    print(f"| alone, 1 pinned core | {t_one:.0f} | {d_one:.0f} |")

    # 2a. Threads: each Python thread pins itself and runs one model; torch releases the GIL in ops.
    results: dict[str, list[float]] = {}
    barrier = threading.Barrier(2)

    def worker(name, run, core, count):
        pin(core, 1)
        run()
        barrier.wait()
        results[name] = timed_passes(run, count)

    ratio = max(1, round(t_one / d_one))  # draft passes per target pass, to end together
    threads = [threading.Thread(target=worker, args=("target", run_target, cores[0], n)),
               threading.Thread(target=worker, args=("draft", run_draft, cores[1], n * ratio))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t_thr, d_thr = ms(results["target"]), ms(results["draft"])
    print(f"| together, threads (core {cores[0]} / core {cores[1]}) | {t_thr:.0f} | {d_thr:.0f} |")

    # 2b. Processes: the draft in a child pinned to core 1, the target here on core 0.
    ctx = mp.get_context("spawn")
    start_evt, out_q = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=draft_process, args=(draft_path, args.context, cores[1], n * ratio, start_evt, out_q))
    child.start()
    del draft  # the child has its own copy; free ours before timing
    pin(cores[0], 1)
    run_target()
    assert out_q.get(timeout=600) == "ready"  # the child has loaded and warmed up its model
    start_evt.set()
    t_proc_list = timed_passes(run_target, n)
    d_proc = ms(out_q.get(timeout=600))
    child.join()
    t_proc = ms(t_proc_list)
    print(f"| together, processes (core {cores[0]} / core {cores[1]}) | {t_proc:.0f} | {d_proc:.0f} |")

    # Work rate: one "unit" = one target pass + ``ratio`` draft passes.
    serial_s = (t_all + ratio * d_all) / 1000
    for name, t, d in (("threads", t_thr, d_thr), ("processes", t_proc, d_proc)):
        overlapped_s = max(t, ratio * d) / 1000
        print(f"\n{name}: one target pass + {ratio} draft passes take {1000 * overlapped_s:.0f} ms overlapped "
              f"vs {1000 * serial_s:.0f} ms in turn on all cores: {serial_s / overlapped_s:.2f}x the work rate")


if __name__ == "__main__":
    main()
