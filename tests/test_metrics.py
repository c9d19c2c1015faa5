"""/metrics (Prometheus) exposes the scheduler's queue, KV and speculation counters, and they move."""

from __future__ import annotations

import re

import pytest
import requests


@pytest.fixture(scope="module")
def metrics_server(tiny_model_factory, tmp_path_factory):
    from server_utils import start_server

    target = tiny_model_factory("llama", seed=0)
    server = start_server(target, tmp_path_factory.mktemp("metrics"), [
        "--enable-metrics", "--max-total-tokens", "1024", "--speculative-policy", "fixed",
        "--speculative-draft-model-path", target, "--speculative-num-draft-tokens", "3"])
    yield server
    server.stop()


def scrape(server) -> dict[str, float]:
    text = requests.get(f"{server.base_url}/metrics", timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(faser:[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


def test_speculation_counters_move(metrics_server):
    before = scrape(metrics_server)
    for name in ("faser:spec_drafted_tokens_total", "faser:spec_accepted_tokens_total",
                 "faser:spec_early_exited_tokens_total", "faser:num_queue_reqs", "faser:kv_usage"):
        assert name in before, f"{name} missing from /metrics"
    r = requests.post(f"{metrics_server.base_url}/generate", timeout=60, json={
        "input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200
    metrics_server.wait_kv_free()
    after = scrape(metrics_server)
    drafted = after["faser:spec_drafted_tokens_total"] - before["faser:spec_drafted_tokens_total"]
    accepted = after["faser:spec_accepted_tokens_total"] - before["faser:spec_accepted_tokens_total"]
    assert drafted > 0
    # The draft is the target itself here, so every drafted token is accepted.
    assert accepted == drafted
    assert after["faser:generated_tokens_total"] - before.get("faser:generated_tokens_total", 0) == 12
    assert after["faser:spec_draft_length_count"] > before.get("faser:spec_draft_length_count", 0)
    assert after["faser:spec_accept_length_count"] > before.get("faser:spec_accept_length_count", 0)
    assert after["faser:kv_used_slots"] == 0


def test_prefix_cache_hits_metrics_and_flush(metrics_server):
    """Two requests sharing a long prefix: the second reports cached_tokens, /metrics the hit
    rate; /flush_cache empties the cache (and the next identical request computes again)."""
    url = metrics_server.base_url
    prefix = list(range(10, 70))

    def generate(ids):
        r = requests.post(f"{url}/generate", timeout=60, json={
            "input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
        assert r.status_code == 200, r.text
        return r.json()

    first, second = generate(prefix + [3]), generate(prefix + [4])
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] >= len(prefix)
    assert second["meta_info"]["prompt_tokens"] == len(prefix) + 1
    state = metrics_server.wait_kv_free()
    assert state["prefix_cache"] and state["kv_cached_slots"] > len(prefix)
    values = scrape(metrics_server)
    assert values["faser:cache_hit_rate"] > 0 and values["faser:cache_hit_tokens_total"] >= len(prefix)
    assert values["faser:kv_cached_slots"] == state["kv_cached_slots"]
    r = requests.post(f"{url}/flush_cache", timeout=30)
    assert r.status_code == 200, r.text
    state = metrics_server.internal_state()
    assert state["kv_cached_slots"] == 0 and state["kv_free_slots"] == state["kv_total_slots"]
    again = generate(prefix + [4])
    assert again["meta_info"]["cached_tokens"] == 0 and again["text"] == second["text"]


def test_disable_radix_cache(tiny_model_factory, tmp_path_factory):
    from server_utils import start_server

    server = start_server(tiny_model_factory("llama", seed=0), tmp_path_factory.mktemp("nocache"),
                          ["--max-total-tokens", "1024", "--disable-radix-cache"])
    try:
        prefix = list(range(10, 70))
        outs = [requests.post(f"{server.base_url}/generate", timeout=60, json={
            "input_ids": prefix + [t], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}).json()
            for t in (3, 3)]
        assert [o["meta_info"]["cached_tokens"] for o in outs] == [0, 0]
        assert outs[0]["text"] == outs[1]["text"]
        state = server.wait_kv_free()
        assert state["prefix_cache"] is False and state["kv_free_slots"] == state["kv_total_slots"]
    finally:
        server.stop()
