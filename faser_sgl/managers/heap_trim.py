"""Give the C heap's free pages back to the operating system now and then.

On a CPU the forward passes allocate activations of a few to a few tens of MiB each (a 1.5B
model's MLP rows at a few hundred tokens), from several threads.  glibc serves sizes below its
mmap threshold from its heaps, and that threshold rises to the largest block freed so far (up to
32 MiB), so after the first long prompt nearly every activation lives in a heap.  Freed blocks
stay in the heaps; what is free at the top of a heap is returned, what is free between live
blocks is not, so the resident size creeps up with every new mix of sizes (recomputed prompts
after retraction, new prompt lengths) although nothing is leaked.  malloc_trim(0) hands the free
pages inside the heaps back as well (madvise), at a cost of milliseconds: the scheduler calls it
when it goes idle and at most every TRIM_INTERVAL_S while it stays busy.  Elsewhere than glibc
this is a no-op.  scripts/bench_scheduler_memory.py measures the resident size with and without.

Measured (docs/reliability.md, 2026-12-07): this is not what made the scheduler's memory creep in
the soaks; trimmed or not, it grew ~20 MiB a round, and capping oneDNN's primitive cache stopped
it.  Trimming stays because it is cheap (~6.5 ms a trim in the soak) and bounds the heap's share.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    TRIM_INTERVAL_S = 30.0

    def __init__(self, interval_s: float | None = None, enabled: bool = True):
        self.interval_s = self.TRIM_INTERVAL_S if interval_s is None else interval_s
        self._trim = _load_trim() if enabled else None
        self._last = time.monotonic()
        self._worked_since_trim = False
        self.num_trims = 0
        self.seconds = 0.0  # spent in malloc_trim so far

    @property
    def available(self) -> bool:
        return self._trim is not None

    def after_step(self) -> None:
        """A step ran: trim if the interval has passed."""
        self._worked_since_trim = True
        if time.monotonic() - self._last >= self.interval_s:
            self.trim()

    def on_idle(self) -> None:
        """Nothing to do: trim once after work, then not again until more work ran."""
        if self._worked_since_trim:
            self.trim()

    def trim(self) -> None:
        start = time.monotonic()
        if self._trim is not None:
            self._trim(0)
            self.num_trims += 1
        self._last = time.monotonic()
        self.seconds += self._last - start
        self._worked_since_trim = False
