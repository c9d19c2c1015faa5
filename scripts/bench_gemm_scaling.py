"""How the cost of the models' linear layers grows with the rows of a forward pass, on this CPU.

    python scripts/bench_gemm_scaling.py [--rows 1 2 3 5 8 16 32 64] [--no-full-pass]

Speculative verification feeds K+1 tokens per request through every linear layer; whether that
is nearly free (weight-read bound) or K+1 times the work (compute bound) decides whether
drafting pays off.  For every distinct projection shape of the embedded target and draft
(q/o, k/v, gate/up, down, LM head) it times, float32, at each row count:

- ``F.linear``: torch's default path (what the executor runs today);
- ``onednn``: the weight pre-packed once by oneDNN (``torch.ops.mkldnn._reorder_linear_weight``,
  packed for 8 rows) and multiplied with ``torch.ops.mkldnn._linear_pointwise``;
- ``mkl``: MKL's packed GEMM (``torch.ops.mkl._mkl_reorder_linear_weight`` packed for 8 rows,
  ``torch.ops.mkl._mkl_linear``).

Then one full target forward pass (faser_sgl's executor, one sequence, logits on every row as a
verification has) at the same row counts, with F.linear everywhere (``cpu_linear="off"``, the
old path) and with executor/cpu_linear.py (``"auto"``, the new one), and the read bandwidth of ``torch.sum`` over a 512 MB
tensor, against which a 1-row pass's weight traffic is measured.  Times are medians of repeats.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from faser_sgl.executor.cpu_linear import PACK_ROWS


def median_ms(fn, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def layer_shapes(config, name: str) -> list[tuple[str, int, int]]:
    """(label, out_features, in_features) of each distinct projection of a model."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = [("q_proj", q, h), ("o_proj", h, q), ("k_proj/v_proj", kv, h), ("gate/up_proj", i, h),
              ("down_proj", h, i), ("lm_head", config.vocab_size, h)]
    return [(f"{name} {label}", n, k) for label, n, k in shapes]


def linear_paths(weight: torch.Tensor) -> dict:
    paths = {"F.linear": lambda x: F.linear(x, weight)}
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        paths["onednn"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        pass
    try:
        mkl = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS)
        paths["mkl"] = lambda x: torch.ops.mkl._mkl_linear(x, mkl, weight, None, PACK_ROWS)
    except (RuntimeError, AttributeError):
        pass
    return paths


def full_pass_ms(runner, rows: int) -> float:
    from faser_sgl.executor.forward_batch import ForwardBatch

    slots = runner.allocator.alloc(rows)
    try:
        batch = ForwardBatch.build([[11] * rows], [slots], [list(range(rows))])
        return median_ms(lambda: runner.forward(batch), repeats=5)
    finally:
        runner.allocator.free(slots)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 5, 8, 16, 32, 64])
    ap.add_argument("--no-full-pass", action="store_true", help="skip the full target pass")
    args = ap.parse_args()

    from faser_sgl import default_models
    from faser_sgl.executor.config import ModelConfig

    target = default_models.ensure(default_models.TARGET)
    draft = default_models.ensure(default_models.DRAFT)
    torch.manual_seed(0)
    print(f"# {platform.node()} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32; median ms per call\n")

    print("| layer (out x in) | path | " + " | ".join(f"{r} rows" for r in args.rows) + " |")
    print("|---|---|" + "---|" * len(args.rows))
    shapes = layer_shapes(ModelConfig.from_pretrained(target), "target") + \
        layer_shapes(ModelConfig.from_pretrained(draft), "draft")
    for label, n, k in shapes:
        weight = torch.randn(n, k) * 0.02
        for path, fn in linear_paths(weight).items():
            ms = [median_ms(lambda: fn(x)) for x in (torch.randn(r, k) for r in args.rows)]
            cells = [f"{m:.2f} ({m / ms[0]:.1f}x)" for m in ms]
            print(f"| {label} ({n}x{k}) | {path} | " + " | ".join(cells) + " |", flush=True)
        del weight

    big = torch.ones(128 * 2**20)  # 512 MB of float32
    sum_ms = median_ms(lambda: big.sum(), repeats=10)
    sum_gbs = big.numel() * 4 / (sum_ms / 1e3) / 1e9
    print(f"\ntorch.sum over 512 MB: {sum_ms:.1f} ms = {sum_gbs:.1f} GB/s read")
    del big
    if args.no_full_pass:
        return

    from faser_sgl.executor.model_runner import ModelRunner

    results = {}
    for path in ("off", "auto"):
        runner = ModelRunner(str(target), dtype=torch.float32, max_total_tokens=256, cpu_linear=path)
        if path == "off":  # all plain here; packed weights are no parameters
            weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        results[path] = [full_pass_ms(runner, r) for r in args.rows]
        if path == "auto":
            plan = {f"{n}x{k}": form for (n, k), form in runner.linear_plan.items()}
        del runner
    print(f"\nfull target pass (faser_sgl executor, {weight_bytes / 1e9:.2f} GB of weights, logits on "
          "every row); off = F.linear everywhere, auto = executor/cpu_linear.py (each weight shape in "
          f"the one form its start-up timing chose: {plan}):\n")
    print("| rows | off ms | off vs 1 row | auto ms | auto vs 1 row | auto vs off | auto weight read GB/s | vs torch.sum |")
    print("|---|---|---|---|---|---|---|---|")
    off, auto = results["off"], results["auto"]
    for i, r in enumerate(args.rows):
        gbs = weight_bytes / (auto[i] / 1e3) / 1e9
        print(f"| {r} | {off[i]:.1f} | {off[i] / off[0]:.2f}x | {auto[i]:.1f} | {auto[i] / auto[0]:.2f}x | "
              f"{auto[i] / off[i]:.2f}x | {gbs:.1f} | {gbs / sum_gbs:.0%} |", flush=True)


if __name__ == "__main__":
    main()
