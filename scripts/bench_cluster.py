"""N replicas behind the router vs fewer, at the same offered load, in one report.

    PYTHONPATH=. .venv/bin/python scripts/bench_cluster.py --replicas 1 2 \
        --cluster-args "--speculative-policy fixed --speculative-num-draft-tokens 2" \
        --request-rates 0.2,0.4 --num-prompts 10 --bursty-num-prompts 0 --output-len 32 \
        --output-dir docs/cluster_results --report docs/cluster_results.md

For each count, `python -m faser_sgl.launch_cluster --replicas N CLUSTER_ARGS` is started, the
load harness (`python -m faser_sgl.bench --base-url ROUTER`, every other flag given here) runs
against the router, and the cluster is stopped; then one report compares them, the first count
being the baseline.  Every count goes through the router, so the only difference is how many
replicas share the machine's cores.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from faser_sgl.bench import cli, report


def start_cluster(replicas: int, port: int, cluster_args: str, log_dir: Path, timeout: float):
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path = log_dir / "launch_cluster.out"
    cmd = [sys.executable, "-m", "faser_sgl.launch_cluster", "--replicas", str(replicas),
           "--port", str(port), "--log-dir", str(log_dir), *shlex.split(cluster_args)]
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while "ready:" not in out_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"cluster of {replicas} did not come up:\n{out_path.read_text()}")
        time.sleep(1)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cluster-args", default="", help="launch_cluster flags and the replicas' server flags")
    parser.add_argument("--port", type=int, default=30100, help="the router's port")
    parser.add_argument("--startup-timeout", type=float, default=1800.0)
    ours, bench_argv = parser.parse_known_args()
    probe = cli.parse_args(bench_argv)
    out_dir = probe.output_dir or Path("bench_results/cluster")
    report_path = probe.report or out_dir / "results.md"

    meta, results = None, []
    for n in ours.replicas:
        label = f"{n}-replica" if n == 1 else f"{n}-replicas"
        proc = start_cluster(n, ours.port, ours.cluster_args, out_dir / "logs" / label, ours.startup_timeout)
        try:
            args = cli.parse_args([*bench_argv, "--base-url", f"http://127.0.0.1:{ours.port}",
                                   "--label", label, "--output-dir", str(out_dir / label),
                                   "--report", str(out_dir / label / "results.md")])
            files = cli.run(args, [*bench_argv, "--label", label])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        run_meta, run_results = report.read_json(files["json"])
        if meta is None:
            meta = dict(run_meta, settings={}, baseline=label)
        meta["settings"][label] = f"launch_cluster --replicas {n} {ours.cluster_args}".strip()
        results += run_results
    meta["command"] = "PYTHONPATH=. .venv/bin/python scripts/bench_cluster.py " + shlex.join(sys.argv[1:])
    files = report.write_all(out_dir, report_path, meta, results)
    print(cli.report_summary(files))


if __name__ == "__main__":
    main()
