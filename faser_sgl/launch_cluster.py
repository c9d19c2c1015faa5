"""Start N faser_sgl replicas on this machine behind SGLang's router, as one endpoint.

    python -m faser_sgl.launch_cluster --replicas N [--host H] [--port P] [server args]

The router is the SGLang Model Gateway (``smg`` on PyPI, the continuation of sglang-router):
cache-aware routing, health checks, load polling through SGLang's /v1/loads, retries of failed
requests on another worker.  Each replica is an unchanged ``faser_sgl.launch_server`` on
127.0.0.1 (port --worker-base-port + i) with its own share of the CPU cores (affinity, and
--faser-num-threads unless given) or, with the flashinfer backend, its own GPU.  Two or more
CPU replicas get --faser-share-weights-mmap unless --no-faser-share-weights-mmap is given: they
map the checkpoint copy-on-write (executor/loader.py), so they share one copy of the weights in
the page cache, which the kernel may evict under memory pressure (docs/cluster.md has the
memory figures and the risk).
``--worker-urls`` adds workers that run elsewhere (other machines); ``--replicas 0`` with it
starts the router alone.  Ctrl-C / SIGTERM stops the router and the replicas (each drains its
running requests, --faser-shutdown-timeout) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from faser_sgl.sglang_flags import given

# A dead local replica should leave the rotation in seconds, not the router's default minute.
ROUTER_DEFAULTS = ["--health-check-interval-secs", "5", "--health-failure-threshold", "2"]


@dataclass
class Process:
    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cores: list[int] | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        cores = self.cores
        with open(self.log_path, "ab") as log:
            # Own session: a terminal's Ctrl-C reaches the launcher only, which stops the rest
            # in order.  The affinity is set in the child before exec, so every thread and
            # process the replica starts inherits it.
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env},
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags; the rest are the replicas' server flags (faser_sgl's and SGLang's)."""
    parser = argparse.ArgumentParser(prog="python -m faser_sgl.launch_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, required=True, help="local faser_sgl servers (0: router only)")
    parser.add_argument("--host", default="127.0.0.1", help="the router's address (the one endpoint)")
    parser.add_argument("--port", type=int, default=30000, help="the router's port")
    parser.add_argument("--worker-base-port", type=int, default=None,
                        help="replica i listens on 127.0.0.1:(this + i); default --port + 1")
    parser.add_argument("--worker-urls", nargs="*", default=[],
                        help="more workers already running elsewhere (http://host:port)")
    parser.add_argument("--router-policy", default="cache_aware",
                        help="the router's --policy (cache_aware, round_robin, power_of_two, ...)")
    parser.add_argument("--router-prometheus-port", type=int, default=None,
                        help="the router's own /metrics port (default --port + 1000)")
    parser.add_argument("--router-args", default="", help="more `smg launch` flags, one string")
    parser.add_argument("--cores-per-replica", type=int, default=None,
                        help="CPU cores each replica is pinned to (default: this process's cores split evenly)")
    parser.add_argument("--log-dir", default=None, help="where each process logs (default: a new temp dir)")
    parser.add_argument("--startup-timeout", type=float, default=1800.0,
                        help="seconds the replicas and the router get to come up")
    parser.add_argument("--stop-timeout", type=float, default=60.0,
                        help="seconds everything gets to stop after Ctrl-C / SIGTERM before it is killed")
    args, server_argv = parser.parse_known_args(argv)
    if args.replicas < 0 or (args.replicas == 0 and not args.worker_urls):
        parser.error("--replicas must be at least 1, or 0 with --worker-urls")
    if args.worker_base_port is None:
        args.worker_base_port = args.port + 1
    if args.router_prometheus_port is None:
        args.router_prometheus_port = args.port + 1000
    return args, server_argv


def split_cores(cores: list[int], replicas: int, per_replica: int | None = None) -> list[list[int]]:
    """Disjoint, contiguous core sets, one per replica; with fewer cores than replicas they
    share (round robin), which works but gains nothing."""
    cores = sorted(cores)
    if replicas <= 0:
        return []
    if per_replica is None:
        per_replica = max(1, len(cores) // replicas)
    return [[cores[(i * per_replica + j) % len(cores)] for j in range(per_replica)]
            for i in range(replicas)]


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d for d in visible.split(",") if d]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def build_replicas(args, server_argv: list[str], log_dir: Path) -> list[Process]:
    cores = split_cores(list(os.sched_getaffinity(0)), args.replicas, args.cores_per_replica)
    on_gpu = "flashinfer" in server_argv and given(server_argv, "--faser-attention-backend")
    gpus = _gpu_ids() if on_gpu and args.replicas else []
    # Replicas on one machine's CPUs share the mapped checkpoint rather than hold a private copy
    # each, unless the flag (or its --no- form) is given explicitly.
    share_weights = not on_gpu and args.replicas >= 2 and not any(
        given(server_argv, f) for f in ("--faser-share-weights-mmap", "--no-faser-share-weights-mmap"))
    replicas = []
    for i in range(args.replicas):
        port = args.worker_base_port + i
        cmd = [sys.executable, "-m", "faser_sgl.launch_server", "--host", "127.0.0.1",
               "--port", str(port), *server_argv]
        if not given(server_argv, "--faser-num-threads"):
            cmd += ["--faser-num-threads", str(len(cores[i]))]
        if share_weights:
            cmd.append("--faser-share-weights-mmap")
        env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {}
        replicas.append(Process(f"replica {i}", cmd, log_dir / f"replica-{i}-{port}.log", env, cores[i]))
    return replicas


def replica_url(args, i: int) -> str:
    return f"http://127.0.0.1:{args.worker_base_port + i}"


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def served_model_name(server_argv: list[str]) -> str:
    """The model id the replicas report (SGLang's rule: --served-model-name, else the path)."""
    name = _flag_value(server_argv, "--served-model-name") or _flag_value(server_argv, "--model-path") \
        or _flag_value(server_argv, "--model")
    if name is None:
        from faser_sgl import default_models

        name = default_models.default_target_path()
    return name


def build_router(args, server_argv: list[str], log_dir: Path) -> Process:
    urls = [replica_url(args, i) for i in range(args.replicas)] + list(args.worker_urls)
    # The router routes OpenAI requests by model id; one SGLang server answers any name. So that
    # clients written against one server ("model": "default") work unchanged, "default" is an
    # alias of the replicas' model.
    alias = ["--model-alias", f"default={served_model_name(server_argv)}"] if args.replicas else []
    cmd = [sys.executable, "-m", "smg", "launch", "--host", args.host, "--port", str(args.port),
           "--worker-urls", *urls, "--policy", args.router_policy,
           "--prometheus-host", args.host, "--prometheus-port", str(args.router_prometheus_port),
           *alias, *ROUTER_DEFAULTS, *shlex.split(args.router_args)]
    return Process("router", cmd, log_dir / "router.log")


def _get_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


class Stopped(Exception):
    """A stop signal arrived while starting."""


def wait_until(ready, processes: list[Process], timeout: float, what: str, stopping=lambda: False) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if stopping():
            raise Stopped()
        for p in processes:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode} while {what}; see {p.log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s {what}")
        time.sleep(0.5)


def router_sees_workers(base: str, count: int) -> bool:
    """The router lists `count` workers (it registers them after their health check)."""
    try:
        r = requests.get(f"{base}/workers", timeout=5)
        return r.status_code == 200 and len(r.json().get("workers", [])) >= count
    except (requests.RequestException, ValueError):
        return False


class Cluster:
    def __init__(self, args, server_argv: list[str]):
        self.args = args
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="faser_sgl_cluster_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.replicas = build_replicas(args, server_argv, self.log_dir)
        self.router = build_router(args, server_argv, self.log_dir)
        self.stopping = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.args.host in ("0.0.0.0", "::") else self.args.host
        return f"http://{host}:{self.args.port}"

    def start(self) -> None:
        for r in self.replicas:
            r.start()
            print(f"[launch_cluster] {r.name}: pid {r.pid}, {replica_url(self.args, self.replicas.index(r))}, "
                  f"cores {r.cores}, log {r.log_path}", flush=True)
        for i, r in enumerate(self.replicas):
            wait_until(lambda: _get_ok(f"{replica_url(self.args, i)}/health"), self.replicas,
                       self.args.startup_timeout, f"waiting for {r.name}", lambda: self.stopping)
        self.router.start()
        print(f"[launch_cluster] router: pid {self.router.pid}, log {self.router.log_path}, "
              f"metrics http://{self.args.host}:{self.args.router_prometheus_port}/metrics", flush=True)
        count = len(self.replicas) + len(self.args.worker_urls)
        wait_until(lambda: _get_ok(f"{self.url}/health") and router_sees_workers(self.url, count),
                   [self.router], 120.0, "waiting for the router", lambda: self.stopping)
        print(f"[launch_cluster] ready: {self.url} ({len(self.replicas)} local replica(s), "
              f"{len(self.args.worker_urls)} remote)", flush=True)

    def supervise(self) -> int:
        """Until a stop signal: report replicas that exit (the router takes them out of the
        rotation); if the router itself exits, the cluster has no endpoint and stops."""
        reported = set()
        while not self.stopping:
            if not self.router.alive():
                print(f"[launch_cluster] the router exited with {self.router.proc.returncode}",
                      flush=True)
                return 1
            for r in self.replicas:
                if not r.alive() and r.name not in reported:
                    reported.add(r.name)
                    print(f"[launch_cluster] {r.name} exited with {r.proc.returncode}; the router "
                          f"serves on the others (log {r.log_path})", flush=True)
            time.sleep(0.5)
        return 0

    def stop(self) -> None:
        """SIGTERM to all: the router drains what it forwards, each replica refuses new
        requests and finishes its running ones; whatever outlives --stop-timeout is killed."""
        self.stopping = True
        everything = [self.router, *self.replicas]
        for p in everything:
            if p.alive():
                p.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.args.stop_timeout
        while any(p.alive() for p in everything) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in everything:
            # The group too: a replica's scheduler and detokenizer must not outlive it.
            p.signal_group(signal.SIGKILL)
            if p.proc is not None:
                p.proc.wait()


def main(argv: list[str] | None = None) -> int:
    args, server_argv = parse_args(sys.argv[1:] if argv is None else argv)
    cluster = Cluster(args, server_argv)

    def on_signal(signum, frame):
        cluster.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        code = cluster.supervise()
    except Stopped:
        code = 0
    except RuntimeError as exc:
        print(f"[launch_cluster] {exc}", file=sys.stderr, flush=True)
        code = 1
    print("[launch_cluster] stopping", flush=True)
    cluster.stop()
    print("[launch_cluster] stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
