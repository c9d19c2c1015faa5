"""Prometheus metrics of the scheduler process (with --enable-metrics).

SGLang's launcher sets PROMETHEUS_MULTIPROC_DIR before it spawns the scheduler, and its /metrics
endpoint aggregates every process's samples, so metrics created here show up there beside the
front half's request counters and latency histograms.  Names use the ``faser:`` prefix.
"""

from __future__ import annotations

DRAFT_LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
ACCEPT_LENGTH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 17)
FRONTIER_BUCKETS = (0, 1, 2, 3, 4, 6, 8)
# Measured step time / the cost model's prediction of it (1: right; both ways by the same factors).
PREDICTION_RATIO_BUCKETS = (0.5, 0.67, 0.8, 0.9, 0.95, 1.05, 1.11, 1.25, 1.5, 2.0, 4.0)


class SchedulerMetrics:
    def __init__(self, labels: dict[str, str]):
        from prometheus_client import Counter, Gauge, Histogram

        names, values = list(labels), list(labels.values())

        def gauge(name, doc):
            return Gauge(name, doc, names, multiprocess_mode="mostrecent").labels(*values)

        def counter(name, doc):
            return Counter(name, doc, names).labels(*values)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, names, buckets=buckets).labels(*values)

        self.num_running_reqs = gauge("faser:num_running_reqs", "Requests in the running batch")
        self.num_queue_reqs = gauge("faser:num_queue_reqs", "Requests waiting to be scheduled")
        self.kv_used_slots = gauge("faser:kv_used_slots", "KV cache slots in use")
        self.kv_usage = gauge("faser:kv_usage", "Fraction of the KV pool in use")
        self.batch_tokens = gauge("faser:step_tokens", "Tokens fed to the target in the last step")
        self.finished_reqs = counter("faser:finished_requests", "Requests finished by the scheduler")
        self.generated_tokens = counter("faser:generated_tokens", "Output tokens emitted")
        self.retractions = counter("faser:retractions", "Requests retracted to free KV slots")
        self.drafted_tokens = counter("faser:spec_drafted_tokens", "Draft tokens proposed for verification")
        self.accepted_tokens = counter("faser:spec_accepted_tokens", "Draft tokens accepted by the target")
        self.early_exited_tokens = counter("faser:spec_early_exited_tokens",
                                           "Draft tokens pruned inside verification (token-wise early exit)")
        self.verify_passes = counter("faser:spec_verify_passes", "Per-request verification passes")
        self.draft_length = histogram("faser:spec_draft_length", "Draft length chosen per request per step",
                                      DRAFT_LENGTH_BUCKETS)
        self.accept_length = histogram("faser:spec_accept_length",
                                       "Tokens emitted per verification pass (accepted drafts + 1)",
                                       ACCEPT_LENGTH_BUCKETS)
        self.cache_hit_rate = gauge("faser:cache_hit_rate",
                                    "Prompt tokens served from the prefix cache / prompt tokens looked up")
        self.cached_slots = gauge("faser:kv_cached_slots", "KV slots the prefix cache holds")
        self.cache_hit_tokens = counter("faser:cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache")
        self.frontiers = histogram("faser:spec_frontiers_per_step", "Draft frontiers verified per step",
                                   FRONTIER_BUCKETS)
        self.prediction_ratio = histogram("faser:spec_step_time_over_prediction",
                                          "Measured step time / the speculation policy's predicted step time",
                                          PREDICTION_RATIO_BUCKETS)

    def observe_step(self, running: int, waiting: int, used_slots: int, total_slots: int,
                     step_tokens: int, new_tokens: int, finished: int) -> None:
        self.num_running_reqs.set(running)
        self.num_queue_reqs.set(waiting)
        self.kv_used_slots.set(used_slots)
        self.kv_usage.set(used_slots / total_slots if total_slots else 0.0)
        self.batch_tokens.set(step_tokens)
        if new_tokens:
            self.generated_tokens.inc(new_tokens)
        if finished:
            self.finished_reqs.inc(finished)

    def observe_cache(self, cache, hit_tokens_before: int) -> None:
        self.cache_hit_rate.set(cache.num_hit_tokens / cache.num_query_tokens if cache.num_query_tokens else 0.0)
        self.cached_slots.set(cache.cached_size)
        if cache.num_hit_tokens > hit_tokens_before:
            self.cache_hit_tokens.inc(cache.num_hit_tokens - hit_tokens_before)

    def observe_verification(self, drafted: int, accepted: int) -> None:
        self.verify_passes.inc()
        self.drafted_tokens.inc(drafted)
        self.accepted_tokens.inc(accepted)
        self.accept_length.observe(accepted + 1)

    def observe_prediction(self, measured_s: float, predicted_s: float) -> None:
        if predicted_s > 0:
            self.prediction_ratio.observe(measured_s / predicted_s)

    def observe_draft_lengths(self, lengths: list[int]) -> None:
        """Every decode's chosen length, zeros included (an adaptive policy's "do not draft")."""
        for k in lengths:
            self.draft_length.observe(k)
