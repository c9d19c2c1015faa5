"""What the scheduler reports about itself: /get_server_info's internal state, and the load
snapshot behind SGLang's /v1/loads.

The load snapshot is what a router balances on: SGLang's schedulers publish a
``load_snapshot.LoadSnapshot`` into a shared-memory slot that the TokenizerManager reads when
/v1/loads is asked (and that the Model Gateway polls).  Without it /v1/loads answers an empty
list and the router balances blind, so the scheduler publishes one too, from its own planner
and pool, at most every PUBLISH_INTERVAL_S while busy and once more when it goes idle.
"""

from __future__ import annotations

import logging
import time

from faser_sgl.executor.onednn_cache import capacity_in_force

logger = logging.getLogger(__name__)

# A router polls loads every few seconds; publishing more often than this only costs time.
PUBLISH_INTERVAL_S = 0.1


def spec_stats(generator) -> dict:
    steps = getattr(generator, "num_verify_steps", 0)
    return {
        # Tokens emitted per verification pass (accepted drafts + the target's own token),
        # the figure sglang.bench_serving reports as the acceptance length.
        "avg_spec_accept_length": (generator.num_accepted + steps) / steps if steps else None,
        "spec_verify_steps": steps,
        "spec_drafted_tokens": getattr(generator, "num_drafted", 0),
        "spec_accepted_tokens": getattr(generator, "num_accepted", 0),
        # Steps whose draft passes a newcomer interrupted (its prefill went first).
        "spec_preempted_steps": getattr(generator, "num_preempted_steps", 0),
        "spec_pipelined_steps": getattr(generator, "num_pipelined_steps", 0),
        "spec_frontier_pipeline": generator.controller.as_dict() if hasattr(generator, "controller") else None,
        # FASER early exit: rows pruned, exit ratio, per exit layer precision/recall.
        "spec_early_exit": generator.early_exit.stats.as_dict()
        if getattr(generator, "early_exit", None) else None,
    }


def cache_stats(cache) -> dict:
    if cache is None:
        return {"prefix_cache": False}
    return {
        "prefix_cache": True,
        "kv_cached_slots": cache.cached_size,
        "kv_evictable_slots": cache.evictable_size,
        "prefix_cache_hit_tokens": cache.num_hit_tokens,
        "prefix_cache_query_tokens": cache.num_query_tokens,
        "prefix_cache_hit_rate": cache.num_hit_tokens / cache.num_query_tokens if cache.num_query_tokens else 0.0,
    }


def internal_state(s) -> dict:
    """/get_server_info's internal_states entry for scheduler ``s``."""
    return {
        "backend": "faser_sgl",
        "speculative_policy": s.policy.name,
        **spec_stats(s.generator),
        "max_total_num_tokens": s.pool_size,
        "kv_total_slots": s.pool_size,
        # Free = what requests can get: unused slots + those only the prefix cache holds
        # (it gives them up on demand); used = held by requests (or locked for them).
        "kv_free_slots": s.allocator.num_available,
        "kv_used_slots": s.pool_size - s.allocator.num_available,
        **cache_stats(s.prefix_cache),
        "num_running_reqs": len(s.planner.running),
        "num_waiting_reqs": len(s.planner.waiting),
        "num_retractions": s.planner.num_retractions,
        # Admission's share of running requests' remaining output kept free (decode_reservation).
        "new_token_ratio": round(s.planner.reservation.ratio, 4),
        "effective_max_running_requests_per_dp": s.max_running_requests,
        "schedule_policy": s.planner.schedule_policy,
        "step_budget_tokens": s.planner.max_step_tokens,
        "prefill_max_requests": s.planner.prefill_max_requests,
        "heap_trims": s.heap_trimmer.num_trims,
        "heap_trim_seconds": round(s.heap_trimmer.seconds, 4),
        "onednn_primitive_cache_capacity": capacity_in_force(),
        "last_gen_throughput": s.last_gen_throughput,
        "context_length": s.context_len,
        "dtype": str(s.dtype).replace("torch.", ""),
        "attention_backend": s.options.attention_backend,
        **s.stats,
    }


def load_snapshot(s):
    """SGLang's LoadSnapshot for scheduler ``s`` (one DP rank, rank 0)."""
    from sglang.srt.managers.load_snapshot import LoadSnapshot, QueueMetrics, SpeculativeMetrics

    used = s.pool_size - s.allocator.num_available
    waiting_tokens = sum(len(r.prompt_ids) + len(r.output_ids) for r in s.planner.waiting)
    gen = s.generator
    steps = getattr(gen, "num_verify_steps", 0)
    speculative = None
    if steps:
        drafted = getattr(gen, "num_drafted", 0)
        speculative = SpeculativeMetrics(
            accept_length=(gen.num_accepted + steps) / steps,
            accept_rate=gen.num_accepted / drafted if drafted else 0.0)
    cache = s.prefix_cache
    return LoadSnapshot(
        timestamp=time.time(),
        dp_rank=0,
        num_running_reqs=len(s.planner.running),
        num_waiting_reqs=len(s.planner.waiting),
        num_waiting_uncached_tokens=waiting_tokens,
        num_used_tokens=used,
        num_total_tokens=used + waiting_tokens,
        num_active_tokens=used + waiting_tokens,
        max_total_num_tokens=s.pool_size,
        max_running_requests=s.max_running_requests,
        token_usage=round(used / s.pool_size, 4) if s.pool_size else 0.0,
        gen_throughput=round(s.last_gen_throughput, 2),
        cache_hit_rate=round(cache.num_hit_tokens / cache.num_query_tokens, 4)
        if cache is not None and cache.num_query_tokens else 0.0,
        utilization=round(len(s.planner.running) / s.max_running_requests, 4),
        speculative=speculative,
        queues=QueueMetrics(waiting=len(s.planner.waiting), grammar=0, paused=0,
                            retracted=s.planner.num_retractions, prealloc_ready=0),
    )


def record_acceptance(path: str, req) -> None:
    """One JSON line per finished request: its verification steps, in the simulator's
    acceptance-trace format (faser_sgl/sim/acceptance.py, ``"steps": [[drafts, accepted], ...]``)."""
    import json

    line = {"rid": req.rid, "prompt_len": len(req.prompt_ids), "output_len": len(req.output_ids),
            "steps": [list(step) for step in req.spec_steps]}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as exc:  # a trace must never stop serving
        logger.warning("acceptance trace not written to %s: %s", path, exc)


class LoadPublisher:
    """Writes the scheduler's load snapshot where SGLang's TokenizerManager reads it."""

    def __init__(self, port_args):
        from sglang.srt.managers.load_snapshot import ShmLoadSnapshotWriter, shm_path_for

        # The shared-memory slot, which is what the TokenizerManager reads on one node (SGLang's
        # create_load_snapshot_writer would ask its runtime context, which only its own
        # scheduler process publishes, whether to use ZMQ; that is for multi-node DP only).
        self.writer = ShmLoadSnapshotWriter(shm_path_for(port_args.instance_id), dp_size=1, dp_rank=0)
        self._last = 0.0
        self._was_busy = True  # publish once at start, so /v1/loads is never empty

    def maybe_publish(self, scheduler, busy: bool) -> None:
        now = time.monotonic()
        if (busy and now - self._last < PUBLISH_INTERVAL_S) or (not busy and not self._was_busy):
            return
        self._was_busy = busy
        self._last = now
        try:
            self.writer.write(load_snapshot(scheduler))
        except Exception as exc:  # a report must never stop serving
            logger.warning("load snapshot not published: %s", exc)

    def close(self) -> None:
        self.writer.close()
