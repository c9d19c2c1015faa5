"""What the soak watches besides its own requests: /health, the resident memory of the server's
processes, the scheduler's queues, a greedy probe whose answer must never change, and the KV pool
once the traffic has stopped."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import psutil
import requests

from faser_sgl.bench.soak_traffic import HttpClient

MIB = 1024 * 1024
PROBE_PROMPT = "The quick brown fox jumps over the lazy dog. Then"
PROBE_NEW_TOKENS = 16


class PeriodicThread:
    """Calls ``tick`` every ``interval`` seconds on a daemon thread until ``stop``."""

    def __init__(self, name: str, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.tick()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def tick(self) -> None:
        raise NotImplementedError


class HealthMonitor(PeriodicThread):
    """GET /health about once a second with a short timeout; every failure is kept."""

    def __init__(self, client: HttpClient, interval: float, timeout: float):
        super().__init__("soak-health", interval)
        self.client, self.timeout = client, timeout
        self.polls = 0
        self.failures: list[str] = []
        self.slowest = 0.0

    def tick(self) -> None:
        start = time.monotonic()
        try:
            status = self.client.get("/health", timeout=self.timeout).status_code
            failure = None if status == 200 else f"HTTP {status}"
        except requests.RequestException as exc:
            failure = type(exc).__name__
        self.polls += 1
        self.slowest = max(self.slowest, time.monotonic() - start)
        if failure:
            self.failures.append(f"{time.strftime('%H:%M:%S')} {failure}")


class StateSampler(PeriodicThread):
    """The scheduler's queues and counters over time: they show that the bursts really
    overflowed it, and whether it kept making progress while a request hung."""
    FIELDS = ("num_running_reqs", "num_waiting_reqs", "kv_used_slots", "num_retractions",
              "num_generated_tokens", "num_finished_requests", "num_aborted_requests")

    PROGRESS = ("num_generated_tokens", "num_finished_requests", "num_aborted_requests")

    def __init__(self, client: HttpClient, interval: float, t0: float, stall_after: float):
        super().__init__("soak-state", interval)
        self.client, self.t0, self.stall_after = client, t0, stall_after
        self.max_running = self.max_waiting = self.max_kv_used = 0
        self.timeline: list[list] = []  # [seconds, *FIELDS]
        self.stalls: list[str] = []
        self._progress: tuple | None = None
        self._progress_at = 0.0
        self._stalled_state: dict | None = None

    def tick(self) -> None:
        try:
            state = self.client.internal_state()
        except (requests.RequestException, ValueError, KeyError, IndexError):
            return  # /health failures are the health monitor's to report
        now = time.monotonic() - self.t0
        self.max_running = max(self.max_running, state.get("num_running_reqs", 0))
        self.max_waiting = max(self.max_waiting, state.get("num_waiting_reqs", 0))
        self.max_kv_used = max(self.max_kv_used, state.get("kv_used_slots", 0))
        self.timeline.append([round(now, 1), *(state.get(f) for f in self.FIELDS)])
        self._watch_progress(state, now)

    def _watch_progress(self, state: dict, now: float) -> None:
        """A stall: requests running or waiting, yet no token generated and none finished or
        aborted for stall_after seconds. SGLang's /health counts any reply from the scheduler as
        life, our own /get_server_info polls included, so it answers 200 through a stall: only
        this and the requests' own timeouts see one."""
        if any(f not in state for f in self.PROGRESS):
            return
        progress = tuple(state[f] for f in self.PROGRESS)
        busy = state.get("num_running_reqs", 0) + state.get("num_waiting_reqs", 0) > 0
        if progress != self._progress or not busy:
            self._end_stall(now)
            self._progress, self._progress_at = progress, now
        elif self._stalled_state is None and now - self._progress_at >= self.stall_after:
            self._stalled_state = state

    def _end_stall(self, now: float) -> None:
        if self._stalled_state is None:
            return
        s = self._stalled_state
        self.stalls.append(
            f"stall: no token generated and no request ended for {now - self._progress_at:.0f}s "
            f"(from t={self._progress_at:.0f}s) with {s.get('num_running_reqs')} running, "
            f"{s.get('num_waiting_reqs')} waiting, kv_used_slots {s.get('kv_used_slots')} of "
            f"{s.get('kv_total_slots')}, kv_cached_slots {s.get('kv_cached_slots')}")
        self._stalled_state = None

    def stop(self) -> None:
        super().stop()
        self._end_stall(time.monotonic() - self.t0)  # a stall still going on counts too


def _describe(proc: psutil.Process) -> str:
    try:
        return " ".join([proc.name(), *proc.cmdline()])
    except psutil.Error:
        return ""


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def find_server_processes(launcher_pid: int) -> dict[str, psutil.Process]:
    """{"launcher" (the HTTP server), "scheduler", "detokenizer"} among the launcher's process
    tree. SGLang names the detokenizer by its proctitle ("sglang::detokenizer"); our scheduler is
    a plain multiprocessing child, so without "scheduler" in its title it is the largest other
    child (it holds the model and the KV pool)."""
    launcher = psutil.Process(launcher_pid)
    roles = {"launcher": launcher}
    others = []
    for child in launcher.children(recursive=True):
        text = _describe(child)
        if "resource_tracker" in text:
            continue
        if "detokenizer" in text and "detokenizer" not in roles:
            roles["detokenizer"] = child
        elif "scheduler" in text and "scheduler" not in roles:
            roles["scheduler"] = child
        else:
            others.append(child)
    if "scheduler" not in roles and others:
        roles["scheduler"] = max(others, key=_rss)
    return roles


def find_listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:port (for --url without --server-pid)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except psutil.Error:
        return None
    return None


class RssSampler(PeriodicThread):
    """RSS (MiB) of each server process every couple of seconds, for the flatness check and the
    plot. A process that disappears is remembered: the server lost a part of itself."""

    def __init__(self, processes: dict[str, psutil.Process], interval: float):
        super().__init__("soak-rss", interval)
        self.processes = processes
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.lost: dict[str, float] = {}

    def tick(self) -> None:
        now = time.monotonic() - self.t0
        sample = {}
        for role, proc in self.processes.items():
            if role in self.lost:
                continue
            try:
                sample[role] = proc.memory_info().rss / MIB
            except psutil.Error:
                self.lost[role] = now
        self.samples.append((now, sample))


@dataclass
class RssVerdict:
    role: str
    start_mib: float
    warm_mib: float  # median of the first 25% of the traffic
    end_mib: float  # median of the last 25%
    last_mib: float
    growth_mib: float
    limit_mib: float
    samples: int

    @property
    def grew(self) -> bool:
        return self.growth_mib > self.limit_mib


def rss_verdicts(samples: list[tuple[float, dict[str, float]]], start: float, end: float,
                 growth_mib: float, growth_frac: float, window_frac: float = 0.25) -> list[RssVerdict]:
    """Median RSS just after warm-up (the first ``window_frac`` of [start, end]) against the last
    ``window_frac``: growth beyond max(growth_mib, growth_frac of the warm median) is a leak.
    Medians, not maxima, so one step's transient allocation does not count."""
    span = max(end - start, 1e-9)
    warm_until, end_from = start + window_frac * span, end - window_frac * span
    roles = sorted({role for _, sample in samples for role in sample})
    verdicts = []
    for role in roles:
        series = [(t, s[role]) for t, s in samples if role in s]
        warm = [v for t, v in series if start <= t <= warm_until]
        late = [v for t, v in series if end_from <= t <= end]
        if len(warm) < 2 or len(late) < 2:
            continue
        warm_median, late_median = statistics.median(warm), statistics.median(late)
        verdicts.append(RssVerdict(role, series[0][1], warm_median, late_median, series[-1][1],
                                   late_median - warm_median, max(growth_mib, growth_frac * warm_median),
                                   len(series)))
    return verdicts


@dataclass
class Prober:
    """A greedy /generate of a fixed prompt: its output ids before, during and after the load
    must all be the same (a scheduler that mixes up KV slots, or a lossy speculation, shows
    here first)."""
    client: HttpClient
    reference: list[int] | None = None
    checks: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reference_text: str | None = None

    def probe(self, when: str) -> None:
        body = {"text": PROBE_PROMPT, "sampling_params": {
            "max_new_tokens": PROBE_NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}}
        try:
            response = self.client.post("/generate", body)
            if response.status_code != 200:
                self.errors.append(f"probe {when}: HTTP {response.status_code}: {response.text[:300]}")
                return
            answer = response.json()
        except (requests.RequestException, ValueError) as exc:
            self.errors.append(f"probe {when}: {exc!r}")
            return
        self.checks += 1
        ids = answer.get("output_ids")
        if self.reference is None:
            self.reference, self.reference_text = ids, answer.get("text")
        elif ids != self.reference:
            self.mismatches.append(f"probe {when}: greedy output {ids} ({answer.get('text')!r}) != "
                                   f"reference {self.reference} ({self.reference_text!r})")


class PeriodicProbe(PeriodicThread):
    def __init__(self, prober: Prober, interval: float):
        super().__init__("soak-probe", interval)
        self.prober = prober
        self._first = True

    def tick(self) -> None:
        if self._first:  # the reference was just taken; the first tick would repeat it
            self._first = False
            return
        self.prober.probe("during traffic")


def wait_quiescent(client: HttpClient, timeout: float) -> tuple[bool, dict]:
    """Wait until no request runs or waits and no KV slot is held by one. With the prefix cache,
    cached slots count as free (kv_free_slots includes the evictable cache), so a leak shows as
    kv_used_slots > 0 or free < total."""
    deadline = time.monotonic() + timeout
    state: dict = {}
    while True:
        try:
            state = client.internal_state()
            if (state["kv_used_slots"] == 0 and state["kv_free_slots"] == state["kv_total_slots"]
                    and state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0):
                return True, state
        except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
            state = {"error": repr(exc)}
        if time.monotonic() >= deadline:
            return False, state
        time.sleep(0.25)
