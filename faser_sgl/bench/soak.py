"""Soak test: a bounded (in requests and in time), seeded mix of every kind of request a running
faser_sgl server accepts, on loopback only, with the server's invariants checked all along.

    python -m faser_sgl.bench.soak --url http://127.0.0.1:30000 --server-pid 1234 --duration 300
    python -m faser_sgl.bench.soak --server-args "--model-path M --speculative-policy fixed ..."

Traffic (weighted, per-worker seeded choice, on ``--concurrency`` worker threads, plus periodic
bursts of 3x the scheduler's max running requests): /generate whole and streamed, greedy and
sampled, text and input_ids; OpenAI chat and completions, whole and streamed; clients that hang
up mid-stream; /abort_request of a running request; n > 1; stop strings; prompts that fill the
context; invalid requests from faser_sgl.bench.fuzz.

Invariants (any break is a violation; the exit code is 0 iff there is none): /health answers
200 throughout; every valid request ends with 200 and a finish reason (or the abort it was
sent), never a hang, a 5xx or a refusal; every invalid one gets a 4xx with a message; afterwards
no KV slot is held and no request runs or waits; the RSS of the HTTP server, scheduler and
detokenizer processes stays flat after warm-up; a greedy probe answers the same before, during
and after the load.

Bounded: no request starts after warm-up + duration or beyond --max-requests; in-flight ones
end by their client timeout, so a run lasts at most about warmup + duration + 2 x
request-timeout + quiescence-timeout.

Writes summary.json, report.md and memory.svg into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from faser_sgl.bench.soak_monitor import (HealthMonitor, PeriodicProbe, Prober, RssSampler, StateSampler,
                                          find_listener_pid, find_server_processes, rss_verdicts, wait_quiescent)
from faser_sgl.bench.soak_report import write_outputs
from faser_sgl.bench.soak_traffic import HttpClient, Recorder, ServerFacts, Traffic

# Relative weights of the categories each worker draws from (bursts run on their own schedule).
DEFAULT_MIX = {
    "generate": 3.0, "generate_stream": 2.0, "chat": 1.5, "chat_stream": 1.5, "completion": 1.5,
    "completion_stream": 1.0, "disconnect": 1.0, "abort": 1.0, "n_sampling": 1.0, "stop_strings": 1.0,
    "context_limit": 0.5, "invalid": 3.0,
}
# Requests that opt into injected faults (Traffic.fault): drawn only when given a weight
# (--inject-faults), since the server must run with fault injection switched on.
FAULT_CATEGORY = "fault"
FAULT_ENV = {"FASER_SGL_FAULT_INJECTION": "1", "FASER_SGL_FAULT_STALL_S": "2"}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class SoakConfig:
    url: str | None = None  # a running server (loopback only) ...
    server_args: list[str] | str | None = None  # ... or the arguments to start one
    server_pid: int | None = None  # the launcher's pid with --url (found by its port otherwise)
    seed: int = 0
    duration: float = 60.0  # seconds of measured traffic
    warmup: float = 0.0  # seconds of traffic before it, outside the RSS windows (invariants still hold)
    max_requests: int = 5000  # requests sent, bursts included (probes and /health polls are not)
    concurrency: int = 4
    out_dir: str | Path | None = None
    api_key: str | None = None
    request_timeout: float = 120.0  # longer without a complete answer = a hung request
    health_interval: float = 1.0
    health_timeout: float = 20.0  # SGLang's own /health gives up (503) after 20 s
    rss_interval: float = 2.0
    rss_growth_mib: float = 64.0
    rss_growth_frac: float = 0.10
    probe_interval: float = 10.0
    burst_interval: float = 20.0
    burst_size: int | None = None  # default: 3x effective max running requests
    max_burst_size: int = 256
    quiescence_timeout: float = 30.0
    stall_timeout: float = 30.0  # busy without any progress this long = a stalled scheduler
    server_start_timeout: float = 600.0
    allow_5xx_from: tuple[str, ...] = ()  # categories or paths whose 5xx are injected faults ("all")
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))


@dataclass
class SoakReport:
    violations: list[str]
    counts: dict[str, dict[str, int]]  # category -> outcome -> requests
    invalid_cases: dict[str, dict[str, int]]  # fuzz case name -> outcome -> requests
    features: dict[str, int]  # variants: text_prompt, ids_prompt, greedy, sampled, n=2, ...
    retractions: int
    requests_sent: int
    summary: dict  # everything, as written to summary.json
    files: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.violations

    def total(self, category: str) -> int:
        return sum(self.counts.get(category, {}).values())


class RequestBudget:
    """The run's cap on requests, shared by the workers and the bursts."""

    def __init__(self, limit: int):
        self.limit, self.sent = limit, 0
        self._lock = threading.Lock()

    def claim(self, wanted: int = 1) -> int:
        with self._lock:
            granted = max(0, min(wanted, self.limit - self.sent))
            self.sent += granted
            return granted


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _vocab_size(model_path: str) -> int:
    config_path = Path(model_path) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if vocab:
            return int(vocab)
    from transformers import AutoConfig  # a hub id: its cached config

    config = AutoConfig.from_pretrained(model_path)
    return int(getattr(config, "vocab_size", None) or config.get_text_config().vocab_size)


def read_server_facts(client: HttpClient) -> ServerFacts:
    info = client.get_json("/get_server_info")
    state = info["internal_states"][0]
    model_path = client.get_json("/get_model_info")["model_path"]
    model = client.get_json("/v1/models")["data"][0]["id"]
    return ServerFacts(
        model=model, model_path=model_path,
        context_length=int(state.get("context_length") or info.get("context_length")),
        pool_tokens=int(state.get("max_total_num_tokens") or info["max_total_num_tokens"]),
        vocab_size=_vocab_size(model_path),
        max_running=int(state.get("effective_max_running_requests_per_dp") or info["max_running_requests"]),
        speculative_policy=state.get("speculative_policy"))


def _import_fuzz():
    """faser_sgl.bench.fuzz, or None: then every invalid request is reported as a violation."""
    try:
        from faser_sgl.bench import fuzz
    except ImportError:
        return None
    return fuzz


def _check_loopback(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the soak only drives loopback servers; {url!r} is on {host!r}")
    return url.rstrip("/")


class SoakRun:
    """One soak against one server: monitors up, reference probe, traffic, quiescence, verdict."""

    def __init__(self, config: SoakConfig, client: HttpClient, launcher_pid: int | None, server_log: Path | None):
        self.config, self.client = config, client
        self.launcher_pid, self.server_log = launcher_pid, server_log
        self.recorder = Recorder()
        self.budget = RequestBudget(config.max_requests)
        self.stop = threading.Event()
        self.bursts = 0
        unknown = set(config.mix) - set(DEFAULT_MIX) - {FAULT_CATEGORY}
        if unknown:
            raise ValueError(f"unknown traffic categories in the mix: {sorted(unknown)}")
        self.mix = {name: weight for name, weight in config.mix.items() if weight > 0}
        # One request of every category first (in a seeded order), then the weighted draw: even a
        # short run covers the rare categories.
        self._coverage = list(self.mix)
        random.Random(f"{config.seed}-coverage").shuffle(self._coverage)
        self._coverage_lock = threading.Lock()

    def run(self) -> SoakReport:
        begin = time.monotonic()
        facts = read_server_facts(self.client)
        self.facts = facts
        wanted = 3 * facts.max_running if self.config.burst_size is None else self.config.burst_size
        self.burst_size = min(wanted, self.config.max_burst_size)
        self.traffic = Traffic(self.client, facts, allow_5xx_from=frozenset(self.config.allow_5xx_from),
                               rid_prefix=f"soak-{self.config.seed}-{random.Random().randrange(16 ** 6):06x}",
                               fuzz=_import_fuzz())
        processes = find_server_processes(self.launcher_pid) if self.launcher_pid else {}
        rss = RssSampler(processes, self.config.rss_interval).start()
        health = HealthMonitor(self.client, self.config.health_interval, self.config.health_timeout).start()
        state_sampler = StateSampler(self.client, 1.0, rss.t0, self.config.stall_timeout).start()
        start_state = self.client.internal_state()
        prober = Prober(self.client)
        prober.probe("before traffic")

        traffic_start, scheduled_end = self._run_traffic(prober)
        traffic_end = time.monotonic()
        # The RSS windows end with the scheduled traffic (or the budget's end): the drain of the
        # last in-flight requests (long if one hung) is quiet and would flatten the end window.
        rss_end = min(traffic_end, scheduled_end)

        quiescent, final_state = wait_quiescent(self.client, self.config.quiescence_timeout)
        prober.probe("after traffic")
        for monitor in (health, state_sampler, rss):
            monitor.stop()

        self._check_invariants(health, prober, quiescent, final_state)
        for stall in state_sampler.stalls:
            self.recorder.violation(stall)
        verdicts = rss_verdicts(rss.samples, traffic_start - rss.t0, rss_end - rss.t0,
                                self.config.rss_growth_mib, self.config.rss_growth_frac)
        for verdict in verdicts:
            if verdict.grew:
                self.recorder.violation(
                    f"rss: {verdict.role} grew {verdict.growth_mib:.1f} MiB after warm-up "
                    f"({verdict.warm_mib:.1f} -> {verdict.end_mib:.1f} MiB median; limit {verdict.limit_mib:.1f})")
        for role, when in rss.lost.items():
            self.recorder.violation(f"process: the {role} process disappeared {when:.1f}s into the soak")

        summary = self._summary(facts, start_state, final_state, quiescent, health, prober, state_sampler,
                                rss, processes, verdicts, traffic_start, traffic_end, rss_end, begin)
        report = SoakReport(summary["violations"], summary["counts"], summary["invalid_cases"], summary["features"],
                            summary["scheduler"]["retractions"], summary["requests_sent"], summary)
        if self.config.out_dir is not None:
            report.files = write_outputs(Path(self.config.out_dir), summary, rss.samples)
        return report

    # ---- traffic ----

    def _run_traffic(self, prober: Prober) -> tuple[float, float]:
        """Warm-up then measured traffic; returns when the measured part began and when the
        last request started (the scheduled end, or earlier once the request budget ran out)."""
        measured_from = time.monotonic() + self.config.warmup
        deadline = measured_from + self.config.duration
        threads = [threading.Thread(target=self._worker, args=(i, deadline), name=f"soak-worker-{i}", daemon=True)
                   for i in range(self.config.concurrency)]
        threads.append(threading.Thread(target=self._burst_loop, args=(deadline,), name="soak-bursts", daemon=True))
        probe = PeriodicProbe(prober, self.config.probe_interval).start()
        for thread in threads:
            thread.start()
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.2)
        last_start = min(deadline, time.monotonic())
        self.stop.set()
        probe.stop()
        # In-flight requests end by their own timeouts; an abort may wait out two of them.
        join_by = time.monotonic() + 2 * self.config.request_timeout + 30
        for thread in threads:
            thread.join(max(0.0, join_by - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            self.recorder.violation(f"hang: soak threads still waiting on the server after the traffic: {stuck}")
        return measured_from, last_start

    def _worker(self, index: int, deadline: float) -> None:
        rng = random.Random(f"{self.config.seed}-worker-{index}")
        names, weights = list(self.mix), list(self.mix.values())
        while not self.stop.is_set() and time.monotonic() < deadline and names:
            if not self.budget.claim():
                return
            category = self._next_uncovered() or rng.choices(names, weights)[0]
            self.recorder.record(self.traffic.run(category, rng))

    def _next_uncovered(self) -> str | None:
        with self._coverage_lock:
            return self._coverage.pop() if self._coverage else None

    def _burst_loop(self, deadline: float) -> None:
        """A burst at once (within a fifth of the run, so even a short run has one), then every
        burst_interval: burst_size long requests at the same moment."""
        next_at = time.monotonic() + min(5.0, (self.config.warmup + self.config.duration) / 5)
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            if time.monotonic() >= deadline:
                return
            size = self.budget.claim(self.burst_size) if self.burst_size > 0 else 0
            if size == 0:
                return
            self._burst(size)
            next_at = max(next_at + self.config.burst_interval, time.monotonic() + 1.0)

    def _burst(self, size: int) -> None:
        index = self.bursts
        self.bursts += 1

        def one(i: int) -> None:
            rng = random.Random(f"{self.config.seed}-burst-{index}-{i}")
            self.recorder.record(self.traffic.run("burst", rng))

        threads = [threading.Thread(target=one, args=(i,), name=f"soak-burst-{index}-{i}", daemon=True)
                   for i in range(size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.config.request_timeout + 30)

    # ---- verdict ----

    def _check_invariants(self, health: HealthMonitor, prober: Prober, quiescent: bool, final_state: dict) -> None:
        violation = self.recorder.violation
        if health.failures:
            violation(f"health: {len(health.failures)} of {health.polls} /health polls failed "
                      f"(first: {health.failures[0]}; last: {health.failures[-1]})")
        for problem in prober.errors + prober.mismatches:
            violation(problem)
        if not quiescent:
            keys = ("kv_used_slots", "kv_free_slots", "kv_total_slots", "num_running_reqs", "num_waiting_reqs", "error")
            violation(f"quiescence: not idle {self.config.quiescence_timeout:.0f}s after the traffic: "
                      + ", ".join(f"{k}={final_state[k]}" for k in keys if k in final_state))

    def _summary(self, facts, start_state, final_state, quiescent, health, prober, state_sampler, rss,
                 processes, verdicts, traffic_start, traffic_end, rss_end, begin) -> dict:
        rec = self.recorder
        valid = [v for cat, vs in rec.latencies.items() for v in vs]
        span = traffic_end - traffic_start
        t_start, t_end = traffic_start - rss.t0, rss_end - rss.t0
        retractions = None
        if "num_retractions" in final_state and "num_retractions" in start_state:
            retractions = final_state["num_retractions"] - start_state["num_retractions"]
        return {
            "passed": rec.violation_total == 0,
            "violations": rec.all_violations(),
            "violation_total": rec.violation_total,
            "config": {**asdict(self.config), "out_dir": str(self.config.out_dir)},
            "server": {"base_url": self.client.base_url, **asdict(facts), "launcher_pid": self.launcher_pid,
                       "log": str(self.server_log) if self.server_log else None},
            "elapsed_s": time.monotonic() - begin,
            "traffic_s": span,  # the measured part (after the warm-up), in-flight requests' drain included
            "warmup_s": self.config.warmup,
            "requests_sent": self.budget.sent,
            "counts": rec.counts,
            "features": rec.features,
            "invalid_cases": rec.invalid_cases,
            "injected_5xx": rec.injected_5xx,
            "latency": {
                "count": len(valid), "p50_s": _percentile(valid, 0.5), "p99_s": _percentile(valid, 0.99),
                "by_category": {cat: {"count": len(vs), "p50_s": _percentile(vs, 0.5), "p99_s": _percentile(vs, 0.99)}
                                for cat, vs in rec.latencies.items()}},
            "scheduler": {
                "retractions": retractions, "bursts": self.bursts, "burst_size": self.burst_size,
                "max_running_seen": state_sampler.max_running, "max_waiting_seen": state_sampler.max_waiting,
                "max_kv_used_seen": state_sampler.max_kv_used, "quiescent": quiescent,
                "start_state": start_state, "final_state": final_state,
                "timeline_fields": ["seconds", *StateSampler.FIELDS], "timeline": state_sampler.timeline},
            "health": {"polls": health.polls, "failures": health.failures, "slowest_s": health.slowest},
            "probe": {"checks": prober.checks, "reference_ids": prober.reference,
                      "reference_text": prober.reference_text, "mismatches": prober.mismatches,
                      "errors": prober.errors},
            "rss": self._rss_summary(rss, processes, verdicts, t_start, t_end, t_end - t_start),
            "server_log_errors": self._server_log_errors(),
        }

    def _rss_summary(self, rss, processes, verdicts, t_start, t_end, span) -> dict:
        by_role = {v.role: v for v in verdicts}
        note = None
        if not processes:
            note = "RSS not sampled: no server pid (pass --server-pid with --url)."
        elif len(by_role) < len(processes):
            note = "Too few samples for the flatness check of some processes (run longer or sample more often)."
        return {
            "note": note,
            "windows_s": {"after warm-up": (t_start, t_start + span / 4), "end": (t_end - span / 4, t_end)},
            "processes": [{"role": role, "pid": proc.pid, **({k: getattr(by_role[role], k) for k in (
                "start_mib", "warm_mib", "end_mib", "last_mib", "growth_mib", "limit_mib", "samples")}
                if role in by_role else {}), "flat": role not in by_role or not by_role[role].grew}
                for role, proc in processes.items()],
            "samples": [[round(t, 2), {k: round(v, 1) for k, v in s.items()}] for t, s in rss.samples],
        }

    def _server_log_errors(self, limit: int = 40) -> list[str]:
        """Tracebacks and error lines of a server we started: where a violation's cause shows."""
        if not self.server_log or not self.server_log.is_file():
            return []
        lines = self.server_log.read_text(errors="replace").splitlines()
        marks = ("Traceback", "Error", "ERROR", "Exception", "exception")
        return [line[:300] for line in lines if any(m in line for m in marks)][-limit:]


def run_soak(config: SoakConfig) -> SoakReport:
    """Run a soak against config.url, or against a server started with config.server_args and
    stopped afterwards."""
    if bool(config.url) == bool(config.server_args):
        raise ValueError("give exactly one of url and server_args")
    if config.url:
        base_url = _check_loopback(config.url)
        pid = config.server_pid or find_listener_pid(urlparse(base_url).port or 80)
        client = HttpClient(base_url, config.api_key, config.request_timeout)
        return SoakRun(config, client, pid, None).run()

    from faser_sgl.bench.server_process import start_server

    args = shlex.split(config.server_args) if isinstance(config.server_args, str) else list(config.server_args)
    server_key = args[args.index("--api-key") + 1] if "--api-key" in args[:-1] else None
    api_key = config.api_key or server_key
    log_dir = Path(config.out_dir) / "server-logs" if config.out_dir else Path(tempfile.mkdtemp(prefix="soak-"))
    # A keyed server's readiness check needs the key too.
    key_kwargs = {"api_key": server_key} if server_key else {}
    # A soak that injects faults starts its server with injection switched on.
    env = FAULT_ENV if config.mix.get(FAULT_CATEGORY, 0) > 0 else None
    server = start_server(args, log_dir, config.server_start_timeout, env=env, **key_kwargs)
    try:
        client = HttpClient(server.base_url, api_key, config.request_timeout)
        return SoakRun(config, client, server.proc.pid, server.log_path).run()
    finally:
        server.stop()


def _mix(text: str) -> dict[str, float]:
    """--mix "invalid=0,abort=3": overrides of the default weights."""
    mix = dict(DEFAULT_MIX)
    for item in filter(None, text.split(",")):
        name, _, weight = item.partition("=")
        mix[name.strip()] = float(weight)
    return mix


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    p = argparse.ArgumentParser(prog="python -m faser_sgl.bench.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:30000")
    target.add_argument("--server-args", help='start a server: "--model-path M --speculative-policy fixed ..."')
    p.add_argument("--server-pid", type=int, help="with --url: the launcher's pid, for RSS (default: found by port)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of measured traffic")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="seconds of traffic before the measured part: outside the RSS flatness windows")
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", default="soak-out", help="directory for summary.json, report.md, memory.svg")
    p.add_argument("--api-key", help="sent as a Bearer token on every request")
    p.add_argument("--request-timeout", type=float, default=120.0, help="a request without an answer by then hung")
    p.add_argument("--health-interval", type=float, default=1.0)
    p.add_argument("--health-timeout", type=float, default=20.0)
    p.add_argument("--rss-interval", type=float, default=2.0)
    p.add_argument("--rss-growth-mib", type=float, default=64.0)
    p.add_argument("--rss-growth-frac", type=float, default=0.10)
    p.add_argument("--probe-interval", type=float, default=10.0)
    p.add_argument("--burst-interval", type=float, default=20.0)
    p.add_argument("--burst-size", type=int, help="default: 3x the effective max running requests; 0: no bursts")
    p.add_argument("--max-burst-size", type=int, default=256)
    p.add_argument("--quiescence-timeout", type=float, default=30.0)
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="requests queued or running but no token generated for this long is a stall")
    p.add_argument("--server-start-timeout", type=float, default=600.0)
    p.add_argument("--allow-5xx-from", default="",
                   help="comma-separated categories or paths whose 5xx are injected faults (counted, not violations); 'all'")
    p.add_argument("--mix", type=_mix, default=dict(DEFAULT_MIX),
                   help="weight overrides, e.g. 'invalid=0,abort=3'; categories: " + ", ".join(DEFAULT_MIX))
    p.add_argument("--inject-faults", type=float, default=0.0, metavar="WEIGHT",
                   help="also draw requests that opt into injected faults (target and draft pass "
                        "faults, output stalls; managers/faults.py) with this weight: a pass fault "
                        "must fail its own request with a 5xx and nothing else. A server started "
                        "here gets FASER_SGL_FAULT_INJECTION=1; with --url, start it so")
    a = p.parse_args(argv)
    if a.inject_faults > 0:
        a.mix[FAULT_CATEGORY] = a.inject_faults
    return SoakConfig(
        url=a.url, server_args=a.server_args, server_pid=a.server_pid, seed=a.seed, duration=a.duration, warmup=a.warmup,
        max_requests=a.max_requests, concurrency=a.concurrency, out_dir=a.out, api_key=a.api_key,
        request_timeout=a.request_timeout, health_interval=a.health_interval, health_timeout=a.health_timeout,
        rss_interval=a.rss_interval, rss_growth_mib=a.rss_growth_mib, rss_growth_frac=a.rss_growth_frac,
        probe_interval=a.probe_interval, burst_interval=a.burst_interval, burst_size=a.burst_size,
        max_burst_size=a.max_burst_size, quiescence_timeout=a.quiescence_timeout, stall_timeout=a.stall_timeout,
        server_start_timeout=a.server_start_timeout,
        allow_5xx_from=tuple(x.strip() for x in a.allow_5xx_from.split(",") if x.strip()), mix=a.mix)


def main(argv: list[str] | None = None) -> int:
    report = run_soak(parse_args(argv))
    s = report.summary
    print(f"soak {'PASSED' if report.passed else 'FAILED'}: {report.requests_sent} requests in "
          f"{s['traffic_s']:.0f}s, {s['scheduler']['retractions']} retractions, "
          f"{s['violation_total']} violations")
    for violation in report.violations[:20]:
        print(f"  - {violation}")
    for name, path in report.files.items():
        print(f"{name}: {path}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
