"""CPU linear layers whose cost grows slowly with the rows of a pass.

Speculative verification feeds K+1 tokens per request through every projection.  On a CPU,
torch's default ``F.linear`` costs about twice as much for 5 rows as for 1 (its small-M GEMM
kernels re-read the weights per row block), which makes every draft token nearly as dear as a
decode step.  oneDNN with the weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) keeps 1-8 rows close to the cost of reading the
weights once, but is slower than ``F.linear`` at a single row on some shapes.
docs/benchmarks.md has the measurements (scripts/bench_gemm_scaling.py).

So each linear gets both: the plain weight for the row counts where ``F.linear`` is fastest and
the packed copy for the others, chosen per weight shape by timing both at start-up
(``choose_paths``) rather than by constants tuned to one machine.  Results differ from
``F.linear`` only by float32 rounding.  The packed copy costs a second copy of the weights.
CUDA never comes here (it keeps its own kernels).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 8  # the batch-size hint the weights are packed for (measured: 2-64 all alike)
TIMED_ROWS = (1, 2, 3, 4, 5, 6, 8, 12, 16)  # above the last, the packed path is used


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """y = x W^T + b through F.linear or oneDNN with pre-packed W, by the row count of x."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed_rows: frozenset[int],
                 packed: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS) \
            if packed is None else packed
        self.packed_rows = packed_rows  # row counts <= TIMED_ROWS[-1] that take the packed path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= TIMED_ROWS[-1] and rows not in self.packed_rows:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def _min_ms(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def choose_paths(weight: torch.Tensor, packed: torch.Tensor) -> frozenset[int]:
    """The row counts up to TIMED_ROWS[-1] that take the packed path: those of TIMED_ROWS at
    which it measured faster on this CPU, and each count between them as the next timed count
    above it decided (F.linear's cliffs come with more rows, so a count left to it by default
    could fall off one: 10 rows once cost twice what 12 did)."""
    chosen = set()
    with torch.inference_mode():
        for rows in TIMED_ROWS:
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device="cpu")
            plain = _min_ms(lambda: F.linear(x, weight))
            fast = _min_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
            if fast < plain:
                chosen.add(rows)
    return fill_untimed(frozenset(chosen))


def fill_untimed(timed_choice: frozenset[int]) -> frozenset[int]:
    """Extend a choice over TIMED_ROWS to every count 1..TIMED_ROWS[-1]: an untimed count
    follows the next timed count above it."""
    chosen = set(timed_choice)
    for rows in range(1, TIMED_ROWS[-1] + 1):
        if rows not in TIMED_ROWS and min(t for t in TIMED_ROWS if t > rows) in timed_choice:
            chosen.add(rows)
    return frozenset(chosen)


def accelerate(model: nn.Module, logits_weight: torch.Tensor | None = None) -> dict[tuple[int, int], frozenset[int]]:
    """Swap every nn.Linear of a float32 CPU model for a PackedLinear (paths timed once per
    distinct weight shape).  ``logits_weight``: an LM head that is no nn.Linear (tied to the
    embeddings); its PackedLinear becomes ``model.logits_linear``.  Returns, per weight shape,
    the row counts that take the packed path."""
    plan: dict[tuple[int, int], frozenset[int]] = {}

    def convert(linear_weight, bias):
        packed = torch.ops.mkldnn._reorder_linear_weight(linear_weight.detach(), PACK_ROWS)
        shape = tuple(linear_weight.shape)
        if shape not in plan:
            plan[shape] = choose_paths(linear_weight.detach(), packed)
        return PackedLinear(linear_weight, bias, plan[shape], packed)

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, convert(child.weight, child.bias))
    if logits_weight is not None:
        model.logits_linear = convert(logits_weight, None)
    return plan
