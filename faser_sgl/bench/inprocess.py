"""Shared loop of the in-process benchmarks (scripts/bench_*.py): greedy requests through an
OfflineEngine with at most ``concurrency`` in the system at once."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


@dataclass
class InProcessRun:
    outputs: list[list[int]]  # per prompt, in order
    tokens_per_s: float  # of the whole run
    latencies: list[float]  # per request: seconds from entering the engine to finishing

    @property
    def mean_latency(self) -> float:
        return statistics.fmean(self.latencies)

    @property
    def p99_latency(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def run_measured(engine, prompts: list[list[int]], new_tokens: int, concurrency: int) -> InProcessRun:
    reqs = [engine.make_request(p, new_tokens, temperature=0) for p in prompts]
    pending = list(reqs)
    entered, finished = {}, {}
    start = time.perf_counter()
    while pending or engine.planner.has_work():
        while pending and len(engine.planner.running) + len(engine.planner.waiting) < concurrency:
            req = pending.pop(0)
            entered[id(req)] = time.perf_counter()
            engine.planner.add(req)
        for req in engine.step():
            finished[id(req)] = time.perf_counter()
    elapsed = time.perf_counter() - start
    return InProcessRun([r.output_ids for r in reqs], sum(len(r.output_ids) for r in reqs) / elapsed,
                        [finished[id(r)] - entered[id(r)] for r in reqs])


def run_at_concurrency(engine, prompts: list[list[int]], new_tokens: int, concurrency: int):
    """Outputs of every prompt (in order) and the tokens/s of the whole run."""
    run = run_measured(engine, prompts, new_tokens, concurrency)
    return run.outputs, run.tokens_per_s
