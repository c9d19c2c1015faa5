"""Frontier-pipeline split costs on a GPU (``gpu_profile.py``'s overlap stage).

The frontier controller (speculative/frontier.py) prices a pipelined round from each side's pass
*while the other side runs*; ``busy_sides`` times exactly that for one ``lanes.py`` split, and
``split_costs`` turns the overlap stage's results into the cost profile's ``splits`` section
(``cost_profile.SplitCost``, read by the simulator's pipeline, sim/pipeline.py).
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def split_costs(overlap: dict | None) -> list[dict]:
    """The cost profile's ``splits`` section (``cost_profile.SplitCost``) from the overlap
    stage: per split, each side's pass while the other side runs as a multiple of the same pass
    on the whole device (``{"scale": x}``), averaged over the measured shapes.  Splits measured
    without both sides busy, or whose green context was unavailable (they ran as plain streams,
    which the "streams" entry already measures), are left out."""
    ratios: dict[str, dict] = {}
    for entry in (overlap or {}).get("results", []):
        for s in entry.get("splits", []):
            if s.get("verify_busy_ms") is None or s.get("draft_busy_ms") is None:
                continue
            if s["split"].endswith("_unavailable") or not entry.get("verify_ms") or not entry.get("draft_ms"):
                continue
            r = ratios.setdefault(s["name"], {"draft_share": s.get("draft_share"), "target": [], "draft": []})
            r["target"].append(s["verify_busy_ms"] / entry["verify_ms"])
            r["draft"].append(s["draft_busy_ms"] / entry["draft_ms"])
    return [{"name": name, "draft_share": r["draft_share"],
             "target": {"scale": round(statistics.fmean(r["target"]), 4)},
             "draft": {"scale": round(statistics.fmean(r["draft"]), 4)}} for name, r in ratios.items()]


def busy_sides(prof, split, draft_round, verify) -> tuple[float, float]:
    """Median ms of each side's pass while the other side runs passes back to back: the
    verification beside a lane that keeps drafting, the lane's draft round beside a thread that
    keeps verifying.  Each timing waits for its own side only (its stream on CUDA), not for
    the device, which would add the other side's pass in flight.  ``prof``: the running
    ``gpu_profile.Profiler`` (its device, plan and sync)."""

    def own_verify():
        with split.target_side():
            verify()
            if prof.device.type == "cuda":
                prof.torch.cuda.current_stream(prof.device).synchronize()

    def loop(fn, stop):
        while not stop.is_set():
            fn()

    def beside(fn, submit, other) -> float:
        stop = threading.Event()
        future = submit(loop, other, stop)
        try:
            for _ in range(prof.plan["warmup"]):
                fn()
            times = []
            for _ in range(prof.plan["reps"]):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        finally:
            stop.set()
            future.result()  # re-raises what the other side hit
        return round(statistics.median(times), 4)

    with ThreadPoolExecutor(1, thread_name_prefix="target-side") as pool:
        v_busy = beside(own_verify, split.lane.submit, lambda: draft_round(split))
        d_busy = beside(lambda: split.lane.submit(draft_round, split).result(), pool.submit, own_verify)
    prof.sync()
    return v_busy, d_busy
