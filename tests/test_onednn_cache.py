"""oneDNN's primitive cache is bounded for the scheduler process unless the user chose a bound
(executor/onednn_cache.py, issue 28 item 4: the scheduler's memory crept with the cache)."""

from __future__ import annotations

from faser_sgl.executor import onednn_cache
from faser_sgl.executor.onednn_cache import ENV, LEGACY_ENV, bound_primitive_cache, capacity_in_force


def test_the_bound_is_set_only_where_the_user_set_none():
    env: dict[str, str] = {}
    assert capacity_in_force(env) == onednn_cache.ONEDNN_DEFAULT
    assert bound_primitive_cache(env) == onednn_cache.DEFAULT_CAPACITY
    assert env == {ENV: str(onednn_cache.DEFAULT_CAPACITY)}

    user = {ENV: "2048"}
    assert bound_primitive_cache(user) == 2048
    assert user == {ENV: "2048"}

    legacy = {LEGACY_ENV: "0"}  # 0 turns oneDNN's cache off; the user's choice stands
    assert bound_primitive_cache(legacy) == 0
    assert ENV not in legacy

    both = {ENV: "16", LEGACY_ENV: "999"}  # oneDNN reads the ONEDNN_ spelling first
    assert capacity_in_force(both) == 16
    assert capacity_in_force({ENV: "many"}) == onednn_cache.ONEDNN_DEFAULT
