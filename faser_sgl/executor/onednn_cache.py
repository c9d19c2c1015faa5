"""A bound on oneDNN's primitive cache, so that a CPU server's memory stays flat.

The packed CPU linear layers (executor/cpu_linear.py) run through oneDNN, which builds one
primitive per matrix shape (rows of the pass x weight shape) and keeps up to 1024 of them per
process, each with its own JIT code and scratch buffers.  A server's passes carry anything from
1 to the step budget's rows, so new shapes keep arriving for a long time and the scheduler's
resident size creeps towards that bound: +366 MiB (6%) over a 30-minute soak, on a saturating
curve, and the same growth with the C heap trimmed (docs/reliability.md).  A smaller cache keeps
the shapes a server reuses (a step touches a handful) and drops the rare ones, which are
rebuilt if they come back (~2 ms for the 1.5B's gate/up weight: 4.5 ms a first call against
2.65 ms a cached one on the Xeon of docs/reliability.md).  What a primitive holds grows with
the rows of its pass (a prefill chunk's scratch buffers are tens of MiB), so the bound is
small: 32 covers the four weight shapes of both models at the row counts of a few recent
steps, which is what decoding reuses.

oneDNN reads the capacity from the environment when it first builds a primitive, so it is set
before the scheduler process starts (launch_server) and is inherited; a value the user set
(ONEDNN_ or the older DNNL_ spelling) is left alone.
"""

from __future__ import annotations

import os
from typing import MutableMapping

ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
LEGACY_ENV = "DNNL_PRIMITIVE_CACHE_CAPACITY"
# docs/reliability.md: the measurements behind it (scripts/bench_scheduler_memory.py, the soak).
DEFAULT_CAPACITY = 32
ONEDNN_DEFAULT = 1024  # oneDNN's own default when neither variable is set


def bound_primitive_cache(environ: MutableMapping[str, str] | None = None,
                          capacity: int = DEFAULT_CAPACITY) -> int:
    """Set the cache's capacity in environ unless the user chose one; return the one in force."""
    environ = os.environ if environ is None else environ
    for name in (ENV, LEGACY_ENV):
        if environ.get(name, "").strip():
            return capacity_in_force(environ)
    environ[ENV] = str(capacity)
    return capacity


def capacity_in_force(environ: MutableMapping[str, str] | None = None) -> int:
    """The capacity oneDNN will use in a process with this environment (ONEDNN_ wins)."""
    environ = os.environ if environ is None else environ
    for name in (ENV, LEGACY_ENV):
        value = environ.get(name, "").strip()
        if value:
            try:
                return max(0, int(value))
            except ValueError:
                return ONEDNN_DEFAULT  # oneDNN ignores a value it cannot parse
    return ONEDNN_DEFAULT
