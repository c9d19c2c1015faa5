"""Tests drive the scheduler's planner and generators in-process through OfflineEngine."""

from __future__ import annotations

from faser_sgl.offline_engine import OfflineEngine


class Engine(OfflineEngine):
    """OfflineEngine that also checks, after every run, that no KV slot leaked."""

    def __init__(self, target_path: str, draft_path: str | None, k: int = 4, slots: int = 8192,
                 max_running: int = 256, policy: str = "fixed", **engine_kwargs):
        super().__init__(target_path, draft_path, policy=policy, num_draft_tokens=k,
                         kv_slots=slots, max_running=max_running, **engine_kwargs)
        self.k = k

    def run(self, reqs):
        outs = super().run(reqs)
        assert self.runner.allocator.num_used == 0, "KV slots leaked"
        return outs
