"""The target's verification pass in float32 against bfloat16 on this CPU (issue 25, item 5).

    .venv/bin/python scripts/bench_cpu_dtype.py [--rows 1,2,3,5,8,16] [--repeats 15]

Loads the embedded target twice in one process, as the server would (float32: one copy per
weight, packed or plain as cpu_linear chooses; bfloat16: plain weights, torch's own kernels),
and times passes of each row count with logits on every row after 64 tokens of context,
interleaving the two models repeat by repeat.  Prints the CPU flags that decide whether
bfloat16 products are native here (avx512_bf16, amx_bf16) and, per row count, the median
(min-max) of each dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from faser_sgl import default_models
from faser_sgl.executor.forward_batch import ForwardBatch


def cpu_flags() -> list[str]:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags.split()]


def main() -> None:
    from faser_sgl.executor.model_runner import ModelRunner

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,3,5,8,16")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(2)
    target = default_models.default_target_path()
    print(f"cpu flags: {' '.join(cpu_flags()) or '(none of avx512f/avx512_bf16/amx)'}; torch {torch.__version__}")
    runners = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        start = time.perf_counter()
        runners[name] = ModelRunner(target, dtype=dtype, max_total_tokens=512)
        print(f"{name}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
    context = list(range(1000, 1064))
    rows = [int(r) for r in args.rows.split(",")]
    times = {(name, n): [] for name in runners for n in rows}
    slots = {name: r.allocator.alloc(64 + max(rows)) for name, r in runners.items()}
    with torch.inference_mode():
        for name, r in runners.items():  # the shared context, once
            r.forward(ForwardBatch.build([context], [slots[name][:64]], [[63]]))
        for rep in range(args.repeats + 1):
            for n in rows:
                for name, r in runners.items():
                    batch = ForwardBatch.build([list(range(2000, 2000 + n))], [slots[name][:64 + n]],
                                               [list(range(n))])
                    start = time.perf_counter()
                    r.forward(batch)
                    if rep:  # the first round warms up
                        times[(name, n)].append(time.perf_counter() - start)
        print("| rows | float32 ms | bfloat16 ms | bf16 / f32 |")
        print("|---|---|---|---|")
        for n in rows:
            f32, b16 = (times[(name, n)] for name in runners)
            m32, m16 = statistics.median(f32) * 1e3, statistics.median(b16) * 1e3
            print(f"| {n} | {m32:.0f} ({min(f32) * 1e3:.0f}-{max(f32) * 1e3:.0f}) | {m16:.0f} "
                  f"({min(b16) * 1e3:.0f}-{max(b16) * 1e3:.0f}) | {m16 / m32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
