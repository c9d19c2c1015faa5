"""Two faser_sgl replicas behind the real SGLang Model Gateway router (smg), started by
`python -m faser_sgl.launch_cluster`: traffic spreads over both, streaming and OpenAI routes
pass through, per-replica statistics stay per replica, and when a replica is killed mid-run
the router keeps serving on the other."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from faser_sgl.launch_cluster import parse_args, split_cores
from reference import hf_greedy, load_hf_model
from server_utils import stream_events

REPO = Path(__file__).resolve().parents[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_run(count: int) -> int:
    """A port p with p .. p+count-1 all free (the router, then one per replica)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65000 and all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no run of free ports")


class ClusterProcess:
    def __init__(self, model: str, log_dir: Path):
        self.port = free_port_run(3)
        self.metrics_port = free_port_run(1)
        self.stdout_path = log_dir / "launch_cluster.out"
        cmd = [sys.executable, "-m", "faser_sgl.launch_cluster", "--replicas", "2",
               "--port", str(self.port), "--router-prometheus-port", str(self.metrics_port),
               "--log-dir", str(log_dir), "--stop-timeout", "30",
               "--model-path", model, "--max-total-tokens", "8192", "--enable-metrics"]
        with open(self.stdout_path, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
        self.url = f"http://127.0.0.1:{self.port}"
        self.replica_urls = [f"http://127.0.0.1:{self.port + 1 + i}" for i in range(2)]
        self.wait_for("ready:", 300)
        self.replica_pids = [int(line.split("pid ")[1].split(",")[0]) for line in self.output().splitlines()
                             if line.startswith("[launch_cluster] replica ") and "pid " in line]

    def output(self) -> str:
        return self.stdout_path.read_text()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}"
                                 for p in self.stdout_path.parent.glob("*.log"))
                raise AssertionError(f"no {text!r} from launch_cluster:\n{self.output()}\n{logs}")
            time.sleep(0.5)

    def finished(self, i: int) -> int:
        state = requests.get(f"{self.replica_urls[i]}/get_server_info", timeout=30).json()["internal_states"][0]
        return state["num_finished_requests"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def cluster(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("llama", seed=0)
    c = ClusterProcess(model, tmp_path_factory.mktemp("cluster"))
    c.model = model
    yield c
    c.stop()


def generate(base: str, prompt: list[int], n: int, stream: bool = False, **params):
    return requests.post(f"{base}/generate", timeout=120, stream=stream, json={
        "input_ids": prompt, "stream": stream,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True, **params}})


def test_cluster_arguments_and_core_split():
    assert split_cores([0, 1], 2) == [[0], [1]]
    assert split_cores([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3]]
    assert split_cores([0, 1], 3) == [[0], [1], [0]]  # more replicas than cores: shared
    args, rest = parse_args(["--replicas", "2", "--port", "9000", "--model-path", "m", "--enable-metrics"])
    assert (args.worker_base_port, args.router_prometheus_port, rest) == (9001, 10000, ["--model-path", "m", "--enable-metrics"])
    with pytest.raises(SystemExit):
        parse_args(["--replicas", "0"])  # nothing to route to
    args, rest = parse_args(["--replicas", "0", "--worker-urls", "http://a:1", "http://b:2"])
    assert args.worker_urls == ["http://a:1", "http://b:2"] and rest == []


def test_cpu_replicas_share_the_mapped_checkpoint_unless_told_not_to(tmp_path):
    from faser_sgl.launch_cluster import build_replicas
    from faser_sgl.options import FaserOptions

    def flags(argv):
        args, rest = parse_args(argv)
        return [r.cmd for r in build_replicas(args, rest, tmp_path)]

    two = flags(["--replicas", "2", "--model-path", "m"])
    assert all(cmd.count("--faser-share-weights-mmap") == 1 for cmd in two)
    assert "--faser-share-weights-mmap" not in flags(["--replicas", "1", "--model-path", "m"])[0]
    told = flags(["--replicas", "2", "--model-path", "m", "--no-faser-share-weights-mmap"])
    assert all("--faser-share-weights-mmap" not in cmd for cmd in told)
    # the flag reaches the scheduler's options
    parser = argparse.ArgumentParser()
    FaserOptions.add_cli_args(parser)
    assert parser.parse_args(["--faser-share-weights-mmap"]).faser_share_weights_mmap is True
    assert parser.parse_args([]).faser_share_weights_mmap is False


def test_dp_size_is_refused_with_a_pointer_to_the_cluster_launcher(tiny_model_factory):
    from faser_sgl.launch_server import prepare_args

    with pytest.raises(SystemExit) as info:
        prepare_args(["--model-path", tiny_model_factory("llama", seed=0), "--dp-size", "2"])
    assert "launch_cluster --replicas 2" in str(info.value)


def test_requests_spread_over_both_replicas_and_every_route_passes(cluster):
    hf = load_hf_model(cluster.model)
    before = [cluster.finished(0), cluster.finished(1)]
    prompts = [[(7 * i + j) % 90 + 3 for j in range(5 + i)] for i in range(12)]
    results = [None] * len(prompts)

    def run(i):
        results[i] = generate(cluster.url, prompts[i], 6)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for prompt, r in zip(prompts, results):
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == hf_greedy(hf, prompt, 6)
    moved = [cluster.finished(i) - before[i] for i in range(2)]
    # Both replicas served (the counts also take in the router's health probes, which SGLang's
    # /health answers with a one-token generation).
    assert sum(moved) >= len(prompts) and min(moved) > 0, moved

    # Streaming /generate through the router: the same tokens, in several events.
    prompt = [11, 12, 13, 14]
    events = stream_events(generate(cluster.url, prompt, 12, stream=True))
    assert len(events) > 1 and events[-1]["output_ids"] == hf_greedy(hf, prompt, 12)

    # OpenAI routes, whole and streamed (the router routes them by the served model name).
    chat = {"model": cluster.model, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 8, "temperature": 0}
    direct = requests.post(f"{cluster.replica_urls[0]}/v1/chat/completions", json=chat, timeout=60).json()
    routed = requests.post(f"{cluster.url}/v1/chat/completions", json=chat, timeout=60)
    assert routed.status_code == 200, routed.text
    assert routed.json()["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    # As with one server, "default" names the served model (launch_cluster's router alias).
    aliased = requests.post(f"{cluster.url}/v1/chat/completions", json={**chat, "model": "default"}, timeout=60)
    assert aliased.status_code == 200, aliased.text
    assert aliased.json()["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    streamed = requests.post(f"{cluster.url}/v1/chat/completions", json={**chat, "stream": True},
                             stream=True, timeout=60)
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in stream_events(streamed) if e.get("choices")]
    assert "".join(pieces) == direct["choices"][0]["message"]["content"]
    completion = requests.post(f"{cluster.url}/v1/completions", timeout=60,
                               json={"model": cluster.model, "prompt": "def f(x):", "max_tokens": 5, "temperature": 0})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 5

    # What the router reads from each worker: model and server info, and load (SGLang's
    # /v1/loads, which the scheduler publishes); the router's own view lists both.
    for url in cluster.replica_urls:
        assert requests.get(f"{url}/get_model_info", timeout=30).json()["model_path"] == cluster.model
        loads = requests.get(f"{url}/v1/loads", timeout=30).json()["loads"]
        assert len(loads) == 1 and loads[0]["max_total_num_tokens"] == 8192
    # The router polls those loads (every 10 s) and shows them per worker.
    deadline = time.monotonic() + 40
    while True:
        workers = requests.get(f"{cluster.url}/workers", timeout=30).json()["workers"]
        polled = {w["url"]: (w.get("engine_load") or {}).get("loads") for w in workers}
        if all(polled.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sorted(polled) == cluster.replica_urls
    assert all(loads and loads[0]["max_total_num_tokens"] == 8192 for loads in polled.values()), polled

    # Statistics stay per replica: each /metrics counts its own requests; the router has its own.
    counts = []
    for i, url in enumerate(cluster.replica_urls):
        text = requests.get(f"{url}/metrics", timeout=30).text
        counts.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("sglang:num_requests_total")))
    assert all(c > 0 for c in counts) and counts[0] != sum(counts), counts
    router_metrics = requests.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=30).text
    assert 'smg_http_requests_total{method="POST",path="/generate"}' in router_metrics


def test_a_killed_replica_fails_only_its_requests_and_the_router_keeps_serving(cluster):
    """Runs last: it kills a replica (its whole process group, as a crash would)."""
    hf = load_hf_model(cluster.model)
    n = 900  # the tiny model's context is 1024
    prompts = [[(5 * i + j) % 90 + 3 for j in range(4 + i % 5)] for i in range(10)]
    progress = [0] * len(prompts)
    outcome: list = [None] * len(prompts)

    def run(i):
        try:
            if i >= 8:  # not streamed: one answer at the end, no progress to watch
                progress[i] = 3
                r = generate(cluster.url, prompts[i], n)
                outcome[i] = (r.status_code, [r.json()] if r.status_code == 200 else r.text)
                return
            r = generate(cluster.url, prompts[i], n, stream=True)
            events = []
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:") and line[5:].strip() != "[DONE]":
                    events.append(json.loads(line[5:]))
                    progress[i] = len(events)
            outcome[i] = (r.status_code, events)
        except requests.RequestException as exc:  # a dropped connection is an error too
            outcome[i] = ("exception", repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while min(progress) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    # The router chose where each request went: kill the replica running the most of them.
    running = [requests.get(f"{url}/v1/loads", timeout=10).json()["loads"][0]["num_running_reqs"]
               for url in cluster.replica_urls]
    victim = running.index(max(running))
    survivor = 1 - victim
    os.killpg(cluster.replica_pids[victim], signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request hung after the replica died"
    assert running[victim] > 0, running

    complete, failed = 0, 0
    for i, result in enumerate(outcome):
        status, events = result
        if status == 200 and events and events[-1].get("meta_info", {}).get("finish_reason"):
            assert events[-1]["output_ids"] == hf_greedy(hf, prompts[i], n)
            complete += 1
        elif isinstance(events, str):
            # Not streamed: an error status with a message.
            failed += 1
            assert status >= 500 and events, (status, events)
        else:
            # Cut off: the router ends the stream with an error event (or the call fails).
            failed += 1
            assert status == "exception" or "error" in events[-1], (status, events[-1:])
    assert failed >= 1 and complete + failed == len(prompts)

    # Requests sent after the failure succeed, on the surviving replica.
    survivor_before = cluster.finished(survivor)
    for prompt in prompts[:6]:
        r = generate(cluster.url, prompt, 5)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == hf_greedy(hf, prompt, 5)
    assert cluster.finished(survivor) - survivor_before >= 6
    cluster.wait_for(f"replica {victim} exited", 30)

    # Ctrl-C / SIGTERM stops the rest and exits 0.
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(90) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(cluster.replica_pids[survivor], 0)
    with pytest.raises(requests.RequestException):
        requests.get(f"{cluster.url}/health", timeout=5)
