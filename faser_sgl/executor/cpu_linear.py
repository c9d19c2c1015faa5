"""CPU linear layers whose cost grows slowly with the rows of a pass, one copy of each weight.

Speculative verification feeds K+1 tokens per request through every projection.  On a CPU,
torch's default ``F.linear`` costs about twice as much for 5 rows as for 1 (its small-M GEMM
kernels re-read the weights per row block), which makes every draft token nearly as dear as a
decode step.  oneDNN with the weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) keeps 1-8 rows close to the cost of reading the
weights once; at a single row it is faster than ``F.linear`` on some CPUs (AMD Zen 4) and
somewhat slower on others (the Xeon of docs/benchmarks.md).

Each weight is kept in one form only, never both (a second copy of a 1.5B model's weights is
~7 GB, which is what stopped two servers from fitting on a 24 GiB machine): packed, served by
oneDNN at every row count, or plain, served by ``F.linear``.  Which one is decided per weight
shape on this machine by timing both forms at the row counts a server's passes have (decode
batches and verification runs, 1-16 rows), over enough weights of that shape to exceed the
last-level cache (as a pass reads them, from memory), in interleaved trials whose medians are
compared, so that a core taken by another process for a moment, or a slow phase of the
machine, cannot decide it (``measure`` / ``choose_form``).  Results differ from ``F.linear`` only by float32
rounding.  CUDA never comes here (it keeps its own kernels).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 8  # the batch-size hint the weights are packed for (measured: 2-64 all alike)
TIMED_ROWS = (1, 2, 3, 5, 8, 16)  # decode batches and K+1 verification runs
TRIALS = 5  # interleaved timing trials per row count and form; their median decides
PACKED, PLAIN = "packed", "plain"


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a [out, in] float32 weight (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] (contiguous) times a packed weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """y = x W^T + b through oneDNN, W held only in its pre-packed layout (no plain copy)."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.packed = packed
        self.bias = bias
        self.out_features, self.in_features = packed.shape

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "PackedLinear":
        return cls(pack(weight), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = packed_linear(flat, self.packed, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    def dense_weight(self) -> torch.Tensor:
        """A new plain [out, in] copy of W (the packed layout cannot be indexed by row)."""
        return self.packed.to_dense()


def last_level_cache_bytes() -> int:
    """This CPU's largest cache (sysfs), or 64 MiB where the kernel does not say."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=64 * 2**20)


def timing_sample_size(weight_bytes: int, count: int) -> int:
    """How many weights of one shape to time in a sweep: enough to hold twice the last-level
    cache, so that each product reads its weight from memory as in a real pass (a weight timed
    alone stays in a large cache, where F.linear's one-row kernel looks far better than it does
    on a pass that streams 7 GB), and never more than the model has."""
    return max(1, min(count, math.ceil(2 * last_level_cache_bytes() / max(weight_bytes, 1))))


def measure(weights: list[torch.Tensor], packs: list[torch.Tensor], rows_list=TIMED_ROWS,
            trials: int = TRIALS, timer: Callable[[], float] | None = None) -> dict[tuple[int, str], float]:
    """Median seconds of one sweep of products (one per weight of the list, as a pass does
    layer after layer) per (rows, form).  The trials are interleaved (each trial times every
    row count on both forms, in alternating order), so that a slow phase of the machine falls
    on both forms alike, and the median ignores a sample that one lucky or unlucky moment
    produced."""
    timer = timer or time.perf_counter

    def plain(x):
        for weight in weights:
            F.linear(x, weight)

    def packed(x):
        for p in packs:
            packed_linear(x, p)

    calls = {PLAIN: plain, PACKED: packed}
    samples: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        inputs = {rows: torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype) for rows in rows_list}
        for x in inputs.values():  # warm-up: first calls pay for oneDNN's kernel creation
            for call in calls.values():
                call(x)
        for trial in range(trials):
            for i, (rows, x) in enumerate(inputs.items()):
                order = (PLAIN, PACKED) if (trial + i) % 2 == 0 else (PACKED, PLAIN)
                for form in order:
                    start = timer()
                    calls[form](x)
                    samples.setdefault((rows, form), []).append(timer() - start)
    return {key: statistics.median(values) for key, values in samples.items()}


def choose_form(medians: dict[tuple[int, str], float]) -> str:
    """PACKED if, over the timed row counts, the packed product costs no more than F.linear in
    geometric mean of the per-count ratios (each row count weighs the same, whatever its size:
    the server's passes range over all of them, and only one form can be kept)."""
    rows_list = sorted({rows for rows, _ in medians})
    log_ratio = sum(math.log(max(medians[(r, PACKED)], 1e-12) / max(medians[(r, PLAIN)], 1e-12))
                    for r in rows_list)
    return PACKED if log_ratio <= 0 else PLAIN


def choose_form_by_timing(weights: list[torch.Tensor], packs: list[torch.Tensor]) -> str:
    """The form this CPU serves weights of this shape best in (measured at start-up)."""
    return choose_form(measure([w.detach() for w in weights], packs))


def accelerate(model: nn.Module) -> dict[tuple[int, int], str]:
    """Replace each nn.Linear of a float32 CPU model whose shape measured faster packed by a
    PackedLinear, dropping its plain weight; the others stay nn.Linear.  Forms are timed once
    per distinct weight shape, on a sample of that shape's weights (timing_sample_size), so
    memory peaks at that sample's packed copies (about twice the last-level cache) over one
    copy of the model.  Returns the form chosen per weight shape."""
    plan: dict[tuple[int, int], str] = {}
    # (parent, name) only: a list holding the nn.Linear modules themselves would keep every
    # replaced plain weight alive until the end, i.e. both copies of the model at the peak.
    groups: dict[tuple[int, int], list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                groups.setdefault(tuple(child.weight.shape), []).append((parent, name))
    for shape, slots in groups.items():
        first = getattr(*slots[0]).weight
        sample = timing_sample_size(first.numel() * first.element_size(), len(slots))
        del first
        packs = [pack(getattr(parent, name).weight) for parent, name in slots[:sample]]
        plan[shape] = choose_form_by_timing([getattr(p, n).weight for p, n in slots[:sample]], packs)
        for i, (parent, name) in enumerate(slots):
            if plan[shape] == PLAIN:
                break
            child = getattr(parent, name)
            packed = packs[i] if i < len(packs) else pack(child.weight)
            setattr(parent, name, PackedLinear(packed, child.bias))
            if i < len(packs):
                packs[i] = None
            del packed, child  # the plain weight goes with the nn.Linear it belonged to
        del packs
    return plan
