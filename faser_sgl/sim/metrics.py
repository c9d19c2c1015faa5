"""The load harness's metrics for simulated requests.

The harness takes its figures from ``sglang.benchmark.serving.calculate_metrics`` (key names of
its BenchmarkMetrics, latencies in ms).  That function needs a tokenizer to re-count output text;
simulated requests have no text, so the same figures are computed here with the same definitions
(TPOT = (latency - TTFT) / (output tokens - 1) for outputs longer than one token; a speculative
step that emits n tokens streams them as one chunk, as the real server does with stream_interval
1, and, as sglang's client does, its gap since the last chunk counts as n inter-token latencies
of gap / n each; retokenized counts = token counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SimRequestResult:
    arrival_s: float
    prompt_len: int
    output_len: int = 0  # tokens emitted so far
    success: bool = True
    error: str = ""
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens) per streamed chunk
    finish_s: float | None = None

    @property
    def ttft_s(self) -> float:
        return self.chunks[0][0] - self.arrival_s if self.chunks else 0.0

    @property
    def latency_s(self) -> float:
        return (self.finish_s - self.arrival_s) if self.finish_s is not None else 0.0

    @property
    def itl_s(self) -> list[float]:
        out = []
        for (t0, _), (t1, n) in zip(self.chunks, self.chunks[1:]):
            out += [(t1 - t0) / n] * n
        return out

    def token_times(self) -> list[float]:
        """sglang's reconstruction: the first chunk's time, then one per inter-token latency."""
        if not self.chunks:
            return []
        return [self.chunks[0][0], *(self.chunks[0][0] + np.cumsum(self.itl_s)).tolist()]


def _stats(prefix: str, values_ms: list[float], with_max: bool = False) -> dict:
    v = np.asarray(values_ms, dtype=float) if values_ms else np.zeros(1)
    out = {f"mean_{prefix}_ms": float(np.mean(v)), f"median_{prefix}_ms": float(np.median(v)),
           f"std_{prefix}_ms": float(np.std(v))}
    for p in (90, 95, 99):
        out[f"p{p}_{prefix}_ms"] = float(np.percentile(v, p))
    if with_max:
        out[f"max_{prefix}_ms"] = float(np.max(v))
    return out


def calculate_metrics(requests: list[SimRequestResult], duration_s: float) -> dict:
    done = [q for q in requests if q.success]
    total_input = sum(q.prompt_len for q in done)
    total_output = sum(q.output_len for q in done)
    dur = max(duration_s, 1e-9)
    ttfts = [q.ttft_s * 1e3 for q in done]
    e2e = [q.latency_s * 1e3 for q in done]
    tpots = [(q.latency_s - q.ttft_s) / (q.output_len - 1) * 1e3 for q in done if q.output_len > 1]
    itls = [x * 1e3 for q in done for x in q.itl_s]
    peak_tokens, peak_concurrency = _peaks(done)
    return {
        "completed": len(done), "total_input": total_input, "total_input_text": total_input,
        "total_input_vision": 0, "total_output": total_output, "total_output_retokenized": total_output,
        "request_throughput": len(done) / dur, "input_throughput": total_input / dur,
        "output_throughput": total_output / dur, "output_throughput_retokenized": total_output / dur,
        "total_throughput": (total_input + total_output) / dur,
        "total_throughput_retokenized": (total_input + total_output) / dur,
        **_stats("ttft", ttfts), **_stats("tpot", tpots), **_stats("itl", itls, with_max=True),
        **_stats("e2e_latency", e2e),
        "concurrency": sum(e2e) / 1e3 / dur,
        "max_output_tokens_per_s": peak_tokens, "max_concurrent_requests": peak_concurrency,
    }


def _peaks(done: list[SimRequestResult]) -> tuple[float, int]:
    """Most tokens streamed in one whole second, and most requests in flight in one (sglang's
    one-second buckets from the first arrival)."""
    if not done:
        return 0.0, 0
    start = min(q.arrival_s for q in done)
    seconds = int(np.ceil(max(q.finish_s for q in done) - start)) + 1
    tokens = np.zeros(seconds)
    inflight = np.zeros(seconds)
    for q in done:
        for t in q.token_times():
            tokens[int(t - start)] += 1
        inflight[int(q.arrival_s - start): int(q.finish_s - start) + 1] += 1
    return float(tokens.max()), int(inflight.max())
