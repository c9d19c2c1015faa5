"""What ``--faser-dtype auto`` means on a CPU: bfloat16 where this CPU multiplies it natively and
a measurement at start-up finds it faster, float32 everywhere else.

Why not always one or the other:
- On CPUs with AVX-512 BF16 (AMD Zen 4) or AMX (Intel Sapphire Rapids and later), a bf16
  product reads half the bytes of float32 and runs on the matrix units, so a pass costs about
  the same for 1 row as for 16 (measured on the AMX Xeon of docs/benchmarks.md: a target pass
  198 ms at 1 row and 209 ms at 16, against 270 and 421 ms in float32).  That flat shape is what
  speculative verification needs: K draft rows ride along nearly free.
- Elsewhere torch emulates bf16 products in float32 arithmetic plus conversions, and bf16 is
  slower than float32 (seen on this project's older machines).
- Flags alone do not settle it (a VM may report a flag its host does not serve fast, or a torch
  build may not use the units), so where the flags say "native" the choice is confirmed by
  timing a linear layer of a decoder's shape in both dtypes.

Greedy output stays token-identical to the float32 reference only in float32; the tests pin
float32 (FASER_SGL_CPU_DTYPE, below) and a user who needs that identity passes
``--faser-dtype float32``.
"""

from __future__ import annotations

import logging
import os
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Environment override of what "auto" resolves to on a CPU ("float32" or "bfloat16"); the test
# suite sets float32 so that its greedy-identity checks hold on every machine.
ENV_VAR = "FASER_SGL_CPU_DTYPE"
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# bf16 must win by this factor: a near tie keeps float32, whose output is the reference.
REQUIRED_SPEEDUP = 0.85
# A decoder-sized projection (a 1.5B model's fused gate/up is 1536 x 17920); several distinct
# weights so that the timing reads memory, not one weight sitting in cache.
PROBE_SHAPE = (4096, 1536)
PROBE_WEIGHTS = 6
PROBE_ROWS = (1, 8)
PROBE_TRIALS = 7


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str]) -> list[str]:
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def measure_bf16_over_fp32() -> float:
    """Time of bf16 over float32 ``F.linear`` on PROBE_SHAPE weights, summed over PROBE_ROWS:
    each dtype's fastest of interleaved trials.  The fastest, because interference only ever
    adds time: at start-up the server's other processes load beside this one, and with the
    medians a busy moment read 0.98x on the AMX Xeon where a quiet one reads 0.52-0.56x."""
    generator = torch.Generator().manual_seed(0)
    weights = {dtype: [torch.randn(PROBE_SHAPE, generator=generator).to(dtype) for _ in range(PROBE_WEIGHTS)]
               for dtype in (torch.float32, torch.bfloat16)}
    inputs = {(dtype, rows): torch.randn(rows, PROBE_SHAPE[1], generator=generator).to(dtype)
              for dtype in weights for rows in PROBE_ROWS}
    best = {dtype: math.inf for dtype in weights}
    with torch.inference_mode():
        for trial in range(PROBE_TRIALS + 1):
            for dtype, ws in weights.items():
                start = time.perf_counter()
                for rows in PROBE_ROWS:
                    for w in ws:
                        F.linear(inputs[(dtype, rows)], w)
                if trial:  # the first round warms the kernels up
                    best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16] / best[torch.float32]


def choose_cpu_dtype(flags: set[str] | None = None, measure=measure_bf16_over_fp32) -> tuple[torch.dtype, str]:
    """(dtype, why) for ``--faser-dtype auto`` on a CPU."""
    pinned = os.environ.get(ENV_VAR)
    if pinned:
        if pinned not in ("float32", "bfloat16"):
            raise ValueError(f"{ENV_VAR}={pinned!r}: expected float32 or bfloat16")
        return getattr(torch, pinned), f"{ENV_VAR}={pinned}"
    native = native_bf16(cpu_flags() if flags is None else flags)
    if not native:
        return torch.float32, "no AVX-512 BF16 or AMX flag: bf16 products would be emulated"
    ratio = measure()
    if ratio <= REQUIRED_SPEEDUP:
        return torch.bfloat16, f"{'/'.join(native)} present and a bf16 linear takes {ratio:.2f}x float32's time"
    return torch.float32, (f"{'/'.join(native)} present but a bf16 linear takes {ratio:.2f}x float32's time "
                           f"(bf16 needs <= {REQUIRED_SPEEDUP}x)")


def resolve_auto_cpu_dtype() -> torch.dtype:
    dtype, why = choose_cpu_dtype()
    logger.info("--faser-dtype auto on this CPU: %s (%s)", str(dtype).removeprefix("torch."), why)
    return dtype
