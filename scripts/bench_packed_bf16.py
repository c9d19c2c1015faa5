"""Is a prepacked oneDNN bfloat16 weight faster than the plain bf16 F.linear the executor uses?

Issue 25, item 5 asks to offer bf16 "through the fastest path on such machines (packed oneDNN
bf16 weights if faster)".  This times, for the embedded target's (Qwen2.5-Coder-1.5B) linear
shapes and a few row counts, one product three ways:
  dense:   torch.nn.functional.linear on a bf16 tensor (what executor/ runs today);
  mkldnn:  the weight converted once to oneDNN's opaque layout (Tensor.to_mkldnn(bf16)) and
           multiplied by torch._C._nn.mkldnn_linear (torch.utils.mkldnn.MkldnnLinear's path);
  packed:  the weight reordered once for the row count (torch.ops.mkldnn._reorder_linear_weight)
           and multiplied by torch.ops.mkldnn._linear_pointwise (what inductor's CPU freezing
           emits).
Each is the median of interleaved trials after a warm-up; outputs are compared to dense.  As in
a real pass, the weights come from memory, not cache: each trial multiplies the next of enough
copies of the weight to exceed --cycle-mb (default 512 MiB, above any last-level cache here).
Run it alone on the machine (two cores: any co-runner swings bf16 products several-fold).

    .venv/bin/python scripts/bench_packed_bf16.py [--rows 1,5,12,92] [--trials 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (name, out_features, in_features) of Qwen2.5-Coder-1.5B's per-layer products.
SHAPES = [("qkv", 1536 + 2 * 256, 1536), ("o_proj", 1536, 1536), ("gate_up", 2 * 8960, 1536),
          ("down", 1536, 8960)]


def packed_ops():
    """The packed path's two ops, or None where this torch lacks them."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def time_one(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,5,12,92")
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--cycle-mb", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    ops = packed_ops()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"mkldnn bf16 supported: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print("| shape | rows | dense ms | mkldnn ms | packed ms | mkldnn / dense | packed / dense | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {}
    with torch.inference_mode():
        for name, out_f, in_f in SHAPES:
            copies = max(1, -(-args.cycle_mb * 2**20 // (out_f * in_f * 2)))
            ws = [(torch.randn(out_f, in_f) * in_f ** -0.5).to(torch.bfloat16) for _ in range(copies)]
            ws_mkldnn = [w.to_mkldnn(torch.bfloat16) for w in ws]
            bias_mkldnn = torch.zeros(out_f).to_mkldnn()
            for rows in rows_list:
                x = torch.randn(rows, in_f).to(torch.bfloat16)
                ways = {"dense": lambda a, i: F.linear(a, ws[i]),
                        "mkldnn": lambda a, i: torch._C._nn.mkldnn_linear(a.to_mkldnn(), ws_mkldnn[i],
                                                                          bias_mkldnn).to_dense()}
                if ops is not None:
                    packed = [ops[0](w, rows) for w in ws]
                    ways["packed"] = lambda a, i: ops[1](a, packed[i], None, "none", [], "")
                ref = ways["dense"](x, 0).float()
                diff = max((fn(x, 0).float() - ref).abs().max().item() for fn in ways.values())
                for fn in ways.values():  # warm-up: first calls create oneDNN primitives
                    for i in range(min(3, copies)):
                        fn(x, i)
                times = {k: [] for k in ways}
                for trial in range(args.trials):
                    for j, (k, fn) in enumerate(ways.items()):
                        i = (trial * len(ways) + j) % copies
                        times[k].append(time_one(lambda a: fn(a, i), x))
                if ops is not None:
                    del packed
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                for k, v in med.items():
                    totals.setdefault((k, rows), 0.0)
                    totals[(k, rows)] += v
                print(f"| {name} {out_f}x{in_f} | {rows} | {med['dense']:.2f} | {med['mkldnn']:.2f} | "
                      f"{med.get('packed', float('nan')):.2f} | {med['mkldnn'] / med['dense']:.2f} | "
                      f"{med.get('packed', float('nan')) / med['dense']:.2f} | {diff:.3g} |")
    print("\nSum over one layer's products (ms):")
    for rows in rows_list:
        d = totals[("dense", rows)]
        parts = [f"dense {d:.2f}"] + [f"{k} {totals[(k, rows)]:.2f} ({totals[(k, rows)] / d:.2f}x)"
                                      for k in ("mkldnn", "packed") if (k, rows) in totals]
        print(f"- {rows} rows: " + ", ".join(parts))


if __name__ == "__main__":
    main()
