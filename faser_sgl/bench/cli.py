"""``python -m faser_sgl.bench``: compare server settings under the same online traffic.

Each ``--setting NAME="SERVER ARGS"`` gets its own server (started, measured, stopped in turn),
so a policy the server gains later is one more command-line value, with no change here.  Every
setting sees the same prompts at the same arrival offsets: a Poisson sweep over
``--request-rates`` and one bursty run (MMPP, or ``--trace``).  ``--repeats N`` runs all of them
N times on each server (the same prompts and arrivals every time), so that the report can show
how far a setting's runs spread, and settings a few percent apart can be told from noise."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import requests

from faser_sgl.bench import report, report_costmodel
from faser_sgl.bench.runner import run_workload
from faser_sgl.bench.server_process import Server, start_server
from faser_sgl.bench.workloads import build_workloads, load_prompts

DEFAULT_SETTINGS = [
    "none=--speculative-policy none",
    "fixed-k2=--speculative-policy fixed --speculative-num-draft-tokens 2",
    "fixed-k4=--speculative-policy fixed --speculative-num-draft-tokens 4",
]


def _rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("request rates must be positive numbers, comma-separated")
    return sorted(rates)


def _setting(text: str) -> tuple[str, str]:
    name, sep, args = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f'--setting wants NAME="SERVER ARGS", got {text!r}')
    return name.strip(), args.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m faser_sgl.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("servers")
    g.add_argument("--setting", action="append", type=_setting, default=None,
                   help='NAME="SERVER ARGS" for faser_sgl.launch_server; repeat for each setting '
                        f"(default: {'; '.join(DEFAULT_SETTINGS)})")
    g.add_argument("--server-args", default="",
                   help="arguments every started server gets, before the setting's own")
    g.add_argument("--base-url", help="measure this running server instead of starting any")
    g.add_argument("--label", default="server", help="the setting's name with --base-url")
    g.add_argument("--baseline", help="setting the ratios are taken against (default: the first)")
    g.add_argument("--server-timeout", type=float, default=900.0)
    g.add_argument("--record-steps", action="store_true",
                   help="start each server with --faser-record-steps OUTPUT_DIR/steps/<setting>.jsonl and "
                        "report its cost model's predicted against measured step time")
    g = p.add_argument_group("traffic")
    g.add_argument("--request-rates", type=_rates, default=_rates("0.05,0.1,0.2,0.4"),
                   help="Poisson sweep, requests/s, comma-separated")
    g.add_argument("--num-prompts", type=int, default=10, help="requests per Poisson rate")
    g.add_argument("--bursty-num-prompts", type=int, default=16, help="requests in the bursty run (0: none)")
    g.add_argument("--bursty-trough-rate", type=float, default=0.02, help="MMPP trough, requests/s")
    g.add_argument("--bursty-peak-ratio", type=float, default=20.0,
                   help="MMPP peak / trough (real traces show 10-35x)")
    g.add_argument("--bursty-mean-dwell", type=float, default=30.0, help="MMPP mean seconds per state")
    g.add_argument("--trace", help="JSON lines with a 'timestamp' (ms) per request, or an Azure LLM inference "
                                   "trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens; arrival times only; "
                                   "azure-code and azure-conv ship with faser_sgl), "
                                   "replayed instead of the MMPP (at most --bursty-num-prompts requests)")
    g.add_argument("--trace-num-prompts", type=int, default=None,
                   help="requests replayed from --trace; given, the bursty MMPP run is kept beside "
                        "the trace (default: the trace replaces it, with --bursty-num-prompts requests)")
    g.add_argument("--trace-time-scale", type=float, default=1.0,
                   help="stretch the trace's arrival offsets by this factor (10: a tenth of its rate)")
    g.add_argument("--trace-sample", type=float, default=1.0,
                   help="keep each trace entry with this probability (seeded), before --bursty-num-prompts")
    g.add_argument("--dataset", default="humaneval", help="'humaneval', 'chat' (40 assistant requests through the chat "
                   "template) or a JSON-lines file with 'prompt'")
    g.add_argument("--max-prompt-len", type=int, default=512, help="drop longer prompts (tokens)")
    g.add_argument("--output-len", type=int, default=64, help="max_new_tokens per request")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--ignore-eos", action="store_true", help="always generate --output-len tokens")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--interleave", action="store_true",
                   help="with --repeats: run repeat 0 of every setting (each on a fresh server), then "
                        "repeat 1 of every setting, ..., so that a drift of the machine's speed during "
                        "the run spreads over all settings instead of landing on whichever runs then")
    g.add_argument("--repeats", type=int, default=1,
                   help="run every workload this many times per server (repeat 0 of all workloads, then "
                        "repeat 1, ...), with the same prompts and arrivals; the report shows their mean "
                        "and spread")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=None,
                   help="results.json, results.csv, PNGs and server logs (default bench_results/<time>)")
    g.add_argument("--report", type=Path, default=None, help="markdown report (default OUTPUT_DIR/results.md)")
    g.add_argument("--report-only", action="store_true",
                   help="rebuild the CSV, plots and report from OUTPUT_DIR/results.json")
    g.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = Path("bench_results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.report is None:
        args.report = args.output_dir / "results.md"
    if args.base_url:
        args.setting = [(args.label, "")]
    elif not args.setting:
        args.setting = [_setting(s) for s in DEFAULT_SETTINGS]
    names = [name for name, _ in args.setting]
    if len(set(names)) != len(names):
        p.error(f"setting names must be unique, got {names}")
    args.baseline = args.baseline or names[0]
    if args.baseline not in names:
        p.error(f"--baseline {args.baseline!r} is not one of {names}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.record_steps and args.base_url:
        p.error("--record-steps needs servers the harness starts (not --base-url)")
    if args.trace_num_prompts is not None and (args.trace_num_prompts < 1 or not args.trace):
        p.error("--trace-num-prompts needs --trace and must be >= 1")
    if args.num_prompts < 1 or args.output_len < 1 or args.bursty_num_prompts < 0:
        p.error("--num-prompts and --output-len must be >= 1, --bursty-num-prompts >= 0")
    if args.trace_time_scale <= 0 or not 0 < args.trace_sample <= 1:
        p.error("--trace-time-scale must be > 0 and --trace-sample in (0, 1]")
    if args.bursty_peak_ratio <= 1 or args.bursty_trough_rate <= 0 or args.bursty_mean_dwell <= 0:
        p.error("the MMPP needs --bursty-peak-ratio > 1 and positive trough rate and dwell")
    return args


def describe_machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {mem_kb / 2**20:.0f} GiB RAM"
    except OSError:
        memory = ""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{memory}{gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def _command_line(argv: list[str] | None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    prog = "python -m faser_sgl.bench" if sys.argv[0].endswith("__main__.py") else \
        f"python {os.path.relpath(sys.argv[0])}"
    return " ".join([prog, *map(shlex.quote, argv)])


def _tokenizer_for(base_url: str):
    from transformers import AutoTokenizer

    # /get_model_info: a router (smg) forwards it; /model_info it does not know.
    info = requests.get(f"{base_url}/get_model_info", timeout=30).json()
    return AutoTokenizer.from_pretrained(info["tokenizer_path"] or info["model_path"])


def server_command(server_args: str, name: str, out_dir: Path, record_steps: bool,
                   first_start: bool = True) -> list[str]:
    """A setting's server arguments, plus its step file with ``record_steps``.  The recorder
    appends, so a file left by an earlier run into the same directory is removed at the
    setting's first server start: the report must describe this run's steps only, all of them
    (with --interleave a setting's server starts once per repeat, and each appends)."""
    argv = shlex.split(server_args)
    if record_steps:
        path = report_costmodel.steps_path(out_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if first_start:
            path.unlink(missing_ok=True)
        argv += ["--faser-record-steps", str(path)]
    return argv


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Path]:
    out_dir: Path = args.output_dir
    if args.report_only:
        meta, results = report.read_json(out_dir / "results.json")
        meta = report_costmodel.refresh(meta, out_dir)  # step files win over the stored summary
        return report.write_all(out_dir, args.report, meta, results)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe_machine(), "command": _command_line(argv),
        "settings": {name: " ".join(filter(None, [args.server_args, extra]))
                     for name, extra in args.setting},
        "baseline": args.baseline, "dataset": args.dataset, "max_prompt_len": args.max_prompt_len,
        "output_len": args.output_len, "temperature": args.temperature,
        "ignore_eos": args.ignore_eos, "seed": args.seed, "repeats": args.repeats,
        "interleave": args.interleave,
    }
    results: list[dict] = []
    workloads = None
    # (setting, repeats run on one server start): all repeats on one server, or with --interleave
    # one repeat per server start, cycling through the settings.
    if args.interleave:
        rounds = [(name, [repeat]) for repeat in range(args.repeats) for name in meta["settings"]]
    else:
        rounds = [(name, list(range(args.repeats))) for name in meta["settings"]]
    started_settings: set[str] = set()
    for name, repeats in rounds:
        server_args = meta["settings"][name]
        if args.base_url:
            server = Server(args.base_url.rstrip("/"), None, None)
        else:
            print(f"[bench] starting server for {name}: {server_args}", flush=True)
            server = start_server(server_command(server_args, name, out_dir, args.record_steps,
                                                 first_start=name not in started_settings),
                                  out_dir / "logs" / name, args.server_timeout)
            started_settings.add(name)
        try:
            if workloads is None:
                tokenizer = _tokenizer_for(server.base_url)
                prompts, lens = load_prompts(args.dataset, tokenizer, args.max_prompt_len)
                meta["num_prompt_pool"] = len(prompts)
                workloads = build_workloads(args, prompts, lens)
            # All workloads once, then again: a slow drift of the machine (heat, a neighbour's
            # load) then spreads over every workload instead of biasing the last repeats of one.
            for repeat in repeats:
                for workload in workloads:
                    server.wait_kv_free(timeout=120)
                    server.flush_prefix_cache()  # every run starts cold, repeats included
                    label = f"{name} {workload.name} {workload.rate:.3g} req/s"
                    if args.repeats > 1:
                        label += f" (repeat {repeat} of 0-{args.repeats - 1})"
                    started = time.monotonic()
                    record = run_workload(server.base_url, workload, tokenizer, args.temperature,
                                          args.ignore_eos, not args.no_progress, label)
                    results.append({"setting": name, "repeat": repeat, **record})
                    m = record["metrics"]
                    print(f"[bench] {label}: {int(m['completed'])}/{workload.num_requests} done in "
                          f"{time.monotonic() - started:.0f}s, {m['output_throughput']:.2f} tok/s, "
                          f"mean e2e {m['mean_e2e_latency_ms'] / 1e3:.2f}s", flush=True)
                    report.write_json(out_dir / "results.json", meta, results)  # survive a crash
        finally:
            server.stop()
    if args.record_steps:
        # Read once every server has stopped and closed its file; the summary goes into
        # results.json so that --report-only can rebuild the section without the step files.
        meta["prediction_error"] = report_costmodel.summarize_settings(out_dir, list(meta["settings"]))
    return report.write_all(out_dir, args.report, meta, results)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    files = run(args, argv)
    print(report_summary(files))


def report_summary(files: dict[str, Path]) -> str:
    meta, results = report.read_json(files["json"])
    lines = report.headline(results, meta["baseline"]) or ["(only the baseline ran)"]
    return "\n".join(["[bench] wrote " + ", ".join(str(p) for p in files.values()), *lines])


if __name__ == "__main__":
    main()
