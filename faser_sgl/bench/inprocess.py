"""Shared loop of the in-process benchmarks (scripts/bench_*.py): greedy requests through an
OfflineEngine with at most ``concurrency`` in the system at once."""

from __future__ import annotations

import time


def run_at_concurrency(engine, prompts: list[list[int]], new_tokens: int, concurrency: int):
    """Outputs of every prompt (in order) and the tokens/s of the whole run."""
    reqs = [engine.make_request(p, new_tokens, temperature=0) for p in prompts]
    pending = list(reqs)
    start = time.perf_counter()
    while pending or engine.planner.has_work():
        while pending and len(engine.planner.running) + len(engine.planner.waiting) < concurrency:
            engine.planner.add(pending.pop(0))
        engine.step()
    elapsed = time.perf_counter() - start
    return [r.output_ids for r in reqs], sum(len(r.output_ids) for r in reqs) / elapsed
