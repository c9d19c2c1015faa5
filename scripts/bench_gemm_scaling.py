"""How the cost of one linear layer grows with the tokens in a forward pass, on this CPU.

    python scripts/bench_gemm_scaling.py

Speculative verification feeds K+1 tokens per request through every linear layer; whether that
is nearly free (weight-read bound) or K+1 times the work (compute bound) decides whether
drafting pays off.  Uses the 1.5B target's MLP shape (8960 x 1536) and torch's default threads.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

ROWS = (1, 2, 5, 9, 16, 32, 64)


def time_linear(rows: int, dtype: torch.dtype, weight: torch.Tensor, repeats: int = 20) -> float:
    x = torch.randn(rows, weight.shape[1]).to(dtype)
    for _ in range(3):
        F.linear(x, weight)
    start = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, weight)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    torch.manual_seed(0)
    weight32 = torch.randn(8960, 1536)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weight 8960x1536\n")
    print("| dtype | " + " | ".join(f"{r} rows" for r in ROWS) + " |")
    print("|---|" + "---|" * len(ROWS))
    for dtype in (torch.float32, torch.bfloat16):
        w = weight32.to(dtype)
        ms = [time_linear(r, dtype, w) for r in ROWS]
        base = ms[0]
        cells = [f"{m:.1f} ms ({m / base:.1f}x)" for m in ms]
        print(f"| {str(dtype).replace('torch.', '')} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
