"""What the simulated clients send and when: arrival offsets with each request's prompt and
output length (only lengths matter to the simulator).

- Poisson and bursty (MMPP) arrivals: the load harness's own generators
  (bench/workloads.py), with lengths from ``LengthSource``.
- An Azure LLM inference trace (CSV), replayed with its own prompt and output lengths,
  time-scaled and/or sampled (``trace_workload``).
- A real load-harness run (its results.json): every workload it ran, with the same arrival
  offsets, prompt lengths and output lengths, so the simulated run is the real one's twin
  (``replay_workloads``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# AZURE_TRACES / resolve_trace: the traces shipped in faser_sgl/data/traces/, shared with the harness.
from faser_sgl.bench.workloads import (AZURE_TRACES, describe_trace, is_azure_csv, mmpp_arrivals,
                                       poisson_arrivals, read_azure_trace, resolve_trace, select_trace,
                                       trace_arrivals)

AZURE_CITATION = ("Azure LLM inference trace 2023 (Azure Public Dataset, CC-BY 4.0): Patel et al., "
                  "\"Splitwise: Efficient generative LLM inference using phase splitting\", ISCA 2024")


@dataclass
class SimWorkload:
    """Request i arrives ``arrivals_s[i]`` seconds after the start with a prompt of
    ``prompt_lens[i]`` tokens and asks for ``output_lens[i]`` new tokens (EOS ignored)."""

    name: str  # "poisson" | "bursty" | "trace", as the load harness names them
    rate: float  # mean offered load, requests/s
    arrivals_s: list[float]
    prompt_lens: list[int]
    output_lens: list[int]
    detail: dict = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return len(self.arrivals_s)


class LengthSource:
    """Prompt and output lengths for generated arrivals: ``fixed:PROMPT:OUTPUT``, an Azure CSV
    or its short name (pairs drawn from the trace), or a harness results.json (pairs drawn from
    the requests of that real run)."""

    def __init__(self, spec: str, max_prompt_len: int | None = None, max_output_len: int | None = None):
        self.spec = spec
        if spec.startswith("fixed:"):
            _, p, o = spec.split(":")
            pairs = [(int(p), int(o))]
        elif is_azure_csv(str(resolve_trace(spec))):
            trace = read_azure_trace(str(resolve_trace(spec)))
            pairs = list(zip(trace.context_tokens, trace.generated_tokens))
        elif spec.endswith(".json"):
            data = json.loads(Path(spec).read_text())
            pairs = [(q["prompt_len"], q["output_len"]) for r in data["results"] for q in r["requests"]
                     if q["success"]]
        else:
            raise ValueError(f"lengths {spec!r}: expected fixed:PROMPT:OUTPUT, azure-code, azure-conv, "
                             "a trace CSV or a harness results.json")
        self.pairs = [(_clip(p, max_prompt_len), _clip(o, max_output_len)) for p, o in pairs]
        if not self.pairs or min(min(p) for p in self.pairs) < 1:
            raise ValueError(f"lengths {spec!r}: every prompt and output needs at least one token")

    def draw(self, num: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        idx = rng.integers(len(self.pairs), size=num) if len(self.pairs) > 1 else np.zeros(num, dtype=int)
        return [self.pairs[i][0] for i in idx], [self.pairs[i][1] for i in idx]


def _clip(n: int, cap: int | None) -> int:
    return min(int(n), cap) if cap else int(n)


def poisson_workloads(rates: list[float], num: int, lengths: LengthSource, seed: int) -> list[SimWorkload]:
    out = []
    for i, rate in enumerate(rates):
        rng = np.random.default_rng([seed, i])
        arrivals = poisson_arrivals(num, rate, rng)
        prompts, outputs = lengths.draw(num, rng)
        out.append(SimWorkload("poisson", rate, arrivals, prompts, outputs, {"lengths": lengths.spec}))
    return out


def bursty_workload(num: int, trough_rate: float, peak_ratio: float, mean_dwell_s: float,
                    lengths: LengthSource, seed: int) -> SimWorkload:
    rng = np.random.default_rng([seed, 1000])
    arrivals, periods = mmpp_arrivals(num, trough_rate, peak_ratio, mean_dwell_s, rng)
    prompts, outputs = lengths.draw(len(arrivals), rng)
    return SimWorkload("bursty", len(arrivals) / max(arrivals[-1], 1e-9), arrivals, prompts, outputs,
                       {"trough_rate": trough_rate, "peak_ratio": peak_ratio, "mean_dwell_s": mean_dwell_s,
                        "periods": periods, "lengths": lengths.spec})


def trace_workload(spec: str, num: int | None, time_scale: float, sample: float, seed: int,
                   lengths: LengthSource | None = None, max_prompt_len: int | None = None,
                   max_output_len: int | None = None) -> SimWorkload:
    """A recorded trace: an Azure CSV brings its own lengths (clipped to the caps); a JSONL
    trace (timestamps only) takes them from ``lengths``."""
    path = resolve_trace(spec)
    rng = np.random.default_rng([seed, 1001])
    if is_azure_csv(str(path)):
        trace = read_azure_trace(str(path))
        idx = select_trace(trace.offsets_s, num, time_scale, sample, rng)
        if not idx:
            raise ValueError(f"trace {path}: no entries kept")
        t0 = trace.offsets_s[idx[0]]
        arrivals = [(trace.offsets_s[i] - t0) * time_scale for i in idx]
        prompts = [_clip(trace.context_tokens[i], max_prompt_len) for i in idx]
        outputs = [_clip(trace.generated_tokens[i], max_output_len) for i in idx]
        source = f"{path.name}, its own lengths"
    else:
        if lengths is None:
            raise ValueError(f"trace {path} has no lengths: give --lengths")
        arrivals = trace_arrivals(str(path), num, time_scale, sample, rng)
        prompts, outputs = lengths.draw(len(arrivals), np.random.default_rng([seed, 1002]))
        source = lengths.spec
    caps = ", ".join(f"{what} capped at {cap}" for what, cap in
                     (("prompts", max_prompt_len), ("outputs", max_output_len)) if cap)
    described = describe_trace(str(path), time_scale, sample, num, len(arrivals))
    detail = {"trace": f"{described}; lengths: {source}{'; ' + caps if caps else ''}",
              "time_scale": time_scale, "sample": sample}
    if path in AZURE_TRACES.values() or "Azure" in path.name:
        detail["citation"] = AZURE_CITATION
    return SimWorkload("trace", len(arrivals) / max(arrivals[-1], 1e-9), arrivals, prompts, outputs, detail)


def replay_workloads(results_json: str | Path) -> tuple[list[SimWorkload], dict]:
    """Every workload of a real harness run (taken from its baseline setting's records), and
    the run's meta (settings, baseline, ...)."""
    data = json.loads(Path(results_json).read_text())
    meta, results = data["meta"], data["results"]
    baseline = meta.get("baseline") or results[0]["setting"]
    out = []
    for r in results:
        if r["setting"] != baseline:
            continue
        reqs = r["requests"]
        # A request that failed in the real run has no output length; it asks for the run's cap.
        cap = meta.get("output_len", 1)
        out.append(SimWorkload(r["workload"], r["rate"], [q["arrival_s"] for q in reqs],
                               [q["prompt_len"] for q in reqs],
                               [q["output_len"] if q["success"] and q["output_len"] else cap for q in reqs],
                               {**r.get("detail", {}), "replayed_from": str(results_json)}))
    return out, meta
