"""Start and stop a real faser_sgl server on 127.0.0.1 as a child process (the harness starts
one per setting; the tests use the same code)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def internal_state(base_url: str) -> dict:
    info = requests.get(f"{base_url}/get_server_info", timeout=30).json()
    return info["internal_states"][0]


def backend_urls(base_url: str) -> list[str]:
    """The servers behind ``base_url``: the workers an SGLang router (smg) lists at /workers,
    or the server itself.  A router forwards /get_server_info to one worker, so per-server
    state (KV in use, speculation counters) is read from each worker directly."""
    try:
        r = requests.get(f"{base_url}/workers", timeout=10)
        workers = r.json().get("workers") if r.status_code == 200 else None
    except (requests.RequestException, ValueError, AttributeError):
        workers = None
    urls = [w["url"].rstrip("/") for w in workers or [] if isinstance(w, dict) and w.get("url")]
    return urls or [base_url]


@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen | None
    log_path: Path | None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def internal_state(self) -> dict:
        return internal_state(self.base_url)

    def wait_kv_free(self, timeout: float = 30.0) -> dict:
        """Wait until the scheduler (behind a router: every worker's) holds no KV slot and no
        request; return its state."""
        deadline = time.monotonic() + timeout
        urls = backend_urls(self.base_url)
        while True:
            states = [internal_state(url) for url in urls]
            if all(s["kv_used_slots"] == 0 and s["num_running_reqs"] == 0 and s["num_waiting_reqs"] == 0
                   for s in states):
                return states[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"KV pool not free after {timeout}s: {states}")
            time.sleep(0.2)

    def flush_prefix_cache(self, timeout: float = 30.0) -> None:
        """Drop every cached prefix (/flush_cache on each backend), so that each run of a
        workload starts cold: its repeats send the same prompts, which a warm radix cache would
        otherwise serve from cache from the second run on."""
        deadline = time.monotonic() + timeout
        for url in backend_urls(self.base_url):
            while True:
                r = requests.post(f"{url}/flush_cache", timeout=30)
                if r.status_code == 200:
                    break
                if time.monotonic() > deadline:  # SGLang's rule: refused while requests run
                    raise AssertionError(f"{url}/flush_cache refused: {r.status_code} {r.text[:200]}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


def start_server(server_args: list[str], log_dir: Path, timeout: float = 600.0,
                 env: dict[str, str] | None = None, host: str | None = "127.0.0.1",
                 api_key: str | None = None) -> Server:
    """Launch ``python -m faser_sgl.launch_server *server_args`` on a free port and return once a
    real generation has gone through (``/health`` answers before warm-up ends).  env: extra
    environment variables; host None: the server's default; api_key: sent on the warm-up."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [sys.executable, "-m", "faser_sgl.launch_server", *(["--host", host] if host else []),
           "--port", str(port), *server_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-5000:]}")
        try:
            if requests.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                r = requests.post(f"{server.base_url}/generate", timeout=120,
                                  headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
                                  json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}})
                if r.status_code == 200:
                    return server
        except requests.RequestException:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server did not come up in {timeout}s:\n{server.log()[-5000:]}")
