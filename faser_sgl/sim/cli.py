"""``python -m faser_sgl.sim``: the load harness's comparison, on a simulated server.

Takes the load harness's settings (``--setting NAME="SERVER ARGS"``) and traffic options, runs
each setting's simulated server through every workload, and writes the harness's results.json,
results.csv, plots and markdown report (bench/report.py), marked as simulated, so real and
simulated runs read side by side.  ``--replay RESULTS.json`` simulates exactly the requests of a
real harness run (arrival offsets, prompt and output lengths, settings).  See docs/simulation.md.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from faser_sgl.bench import report
from faser_sgl.bench.cli import DEFAULT_SETTINGS, _command_line, _rates, _setting, describe_machine
from faser_sgl.sim.acceptance import load_acceptance
from faser_sgl.sim.arrivals import (LengthSource, bursty_workload, poisson_workloads, replay_workloads,
                                    trace_workload)
from faser_sgl.sim.cost_profile import BUILTIN, load_cost_profile
from faser_sgl.sim.engine import SimServer
from faser_sgl.sim.records import DEFAULT_RECORDS
from faser_sgl.sim.settings import parse_setting

SIM_DEFAULT_SETTINGS = DEFAULT_SETTINGS + [
    "adaptive-k4=--speculative-policy adaptive --speculative-num-draft-tokens 4",
    "faser-k4=--speculative-policy faser --speculative-num-draft-tokens 4",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m faser_sgl.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("simulated servers")
    g.add_argument("--setting", action="append", type=_setting, default=None,
                   help='NAME="SERVER ARGS" as for the load harness; repeat for each setting '
                        f"(default: {'; '.join(SIM_DEFAULT_SETTINGS)})")
    g.add_argument("--server-args", default="", help="arguments every setting gets, before its own")
    g.add_argument("--baseline", help="setting the ratios are taken against (default: the first)")
    g.add_argument("--cost-profile", default="cpu-xeon-2core",
                   help=f"pass costs: {', '.join(BUILTIN)}, a JSON file, or "
                        "'target=FIXED_MS+PER_TOKEN_MS,draft=FIXED_MS+PER_TOKEN_MS'")
    g.add_argument("--cost-profile-for", action="append", default=[], metavar="SETTING=PROFILE",
                   help="this setting's own cost profile (e.g. one fitted from the steps a real "
                        "server recorded under that setting); repeat per setting")
    g.add_argument("--cost-noise", type=float, default=0.0,
                   help="coefficient of variation of a lognormal jitter on every pass (0: none)")
    g.add_argument("--acceptance", default=str(DEFAULT_RECORDS),
                   help="'bernoulli:RATE', an acceptance trace (JSONL) or a records file of "
                        "scripts/bench_early_exit.py (default: the recorded embedded pair)")
    g.add_argument("--exit-records", default=str(DEFAULT_RECORDS),
                   help="recorded predictor scores for early exit (scripts/bench_early_exit.py --records-out)")
    g = p.add_argument_group("traffic")
    g.add_argument("--replay", type=Path, help="simulate the requests and settings of this harness results.json")
    g.add_argument("--request-rates", type=_rates, default=_rates("0.05,0.1,0.2,0.4"))
    g.add_argument("--num-prompts", type=int, default=10, help="requests per Poisson rate (0: no sweep)")
    g.add_argument("--bursty-num-prompts", type=int, default=16, help="requests in the bursty run (0: none)")
    g.add_argument("--bursty-trough-rate", type=float, default=0.02)
    g.add_argument("--bursty-peak-ratio", type=float, default=20.0)
    g.add_argument("--bursty-mean-dwell", type=float, default=30.0)
    g.add_argument("--trace", help="azure-code, azure-conv, an Azure CSV or a JSONL trace (replaces the MMPP run)")
    g.add_argument("--trace-time-scale", type=float, default=1.0, help="stretch arrival offsets (10: a tenth of the rate)")
    g.add_argument("--trace-sample", type=float, default=1.0, help="keep each trace entry with this probability")
    g.add_argument("--trace-max-requests", type=int, default=None, help="replay at most this many trace entries")
    g.add_argument("--lengths", default="fixed:150:32",
                   help="prompt/output lengths of generated arrivals: fixed:PROMPT:OUTPUT, azure-code, "
                        "azure-conv, a trace CSV or a harness results.json")
    g.add_argument("--max-prompt-len", type=int, default=None, help="cap prompt lengths (tokens)")
    g.add_argument("--max-output-len", type=int, default=None, help="cap output lengths (tokens)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=None, help="default sim_results/<time>")
    g.add_argument("--report", type=Path, default=None, help="markdown report (default OUTPUT_DIR/results.md)")
    g.add_argument("--report-only", action="store_true", help="rebuild the outputs from OUTPUT_DIR/results.json")
    args = p.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = Path("sim_results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.report is None:
        args.report = args.output_dir / "results.md"
    if args.num_prompts < 0 or args.bursty_num_prompts < 0:
        p.error("--num-prompts and --bursty-num-prompts must be >= 0")
    if args.trace_time_scale <= 0 or not 0 < args.trace_sample <= 1:
        p.error("--trace-time-scale must be > 0 and --trace-sample in (0, 1]")
    return args


def build_workloads(args) -> tuple[list, dict]:
    """The workloads and, for --replay, the real run's meta (else {})."""
    if args.replay:
        return replay_workloads(args.replay)
    lengths = LengthSource(args.lengths, args.max_prompt_len, args.max_output_len)
    workloads = poisson_workloads(args.request_rates, args.num_prompts, lengths, args.seed) \
        if args.num_prompts else []
    if args.trace:
        workloads.append(trace_workload(args.trace, args.trace_max_requests, args.trace_time_scale,
                                        args.trace_sample, args.seed, lengths, args.max_prompt_len,
                                        args.max_output_len))
    elif args.bursty_num_prompts:
        workloads.append(bursty_workload(args.bursty_num_prompts, args.bursty_trough_rate,
                                         args.bursty_peak_ratio, args.bursty_mean_dwell, lengths, args.seed))
    return workloads, {}


def simulate(args, argv=None) -> tuple[dict, list[dict]]:
    """Run every setting through every workload; the harness's (meta, results)."""
    workloads, real_meta = build_workloads(args)
    if not workloads:
        raise SystemExit("nothing to simulate: no Poisson rate, bursty run or trace")
    settings = args.setting or ([(n, a) for n, a in real_meta["settings"].items()] if real_meta else
                                [_setting(s) for s in SIM_DEFAULT_SETTINGS])
    names = [n for n, _ in settings]
    if len(set(names)) != len(names):
        raise SystemExit(f"setting names must be unique, got {names}")
    baseline = args.baseline or real_meta.get("baseline") or names[0]
    if baseline not in names:
        raise SystemExit(f"--baseline {baseline!r} is not one of {names}")
    profile = load_cost_profile(args.cost_profile)
    own_profiles = {}
    for item in args.cost_profile_for:
        name, sep, spec = item.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"--cost-profile-for {item!r}: expected SETTING=PROFILE with SETTING one of {names}")
        own_profiles[name] = load_cost_profile(spec)
    acceptance = load_acceptance(args.acceptance)
    pairs = {(p, o) for w in workloads for p, o in zip(w.prompt_lens, w.output_lens)}
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"SIMULATED: {profile.describe()}; simulator run on {describe_machine()}",
        "command": _command_line(argv).replace("faser_sgl.bench", "faser_sgl.sim"),
        "settings": {name: " ".join(filter(None, [args.server_args, extra])) for name, extra in settings},
        "baseline": baseline,
        "dataset": "simulated requests (lengths only: " + (f"replay of {args.replay}" if args.replay else
                                                           f"{args.lengths}") + ")",
        "num_prompt_pool": len(pairs),
        "max_prompt_len": max(p for p, _ in pairs),
        "output_len": max(o for _, o in pairs),
        "temperature": "n/a (simulated)",
        "ignore_eos": True,
        "seed": args.seed,
        "simulation": {"cost_profile": profile.to_dict(),
                       "cost_profile_for": {n: p.to_dict() for n, p in own_profiles.items()},
                       "acceptance": acceptance.describe(),
                       "exit_records": args.exit_records, "cost_noise": args.cost_noise,
                       "validation": "pending: no comparison against real-server runs yet"},
    }
    results = []
    for name, server_args in meta["settings"].items():
        server = SimServer(parse_setting(name, server_args), own_profiles.get(name, profile), acceptance,
                           args.seed, args.exit_records, args.cost_noise)
        for i, workload in enumerate(workloads):
            record = server.run(workload, i)
            results.append({"setting": name, **record})
            m = record["metrics"]
            print(f"[sim] {name} {workload.name} {workload.rate:.3g} req/s: {int(m['completed'])}/"
                  f"{workload.num_requests} done, {m['output_throughput']:.2f} tok/s, mean e2e "
                  f"{m['mean_e2e_latency_ms'] / 1e3:.2f}s (simulated)", flush=True)
    return meta, results


def mark_simulated(report_path: Path, meta: dict) -> None:
    """The harness's report, headed as a simulation with its inputs."""
    lines = report_path.read_text().splitlines()
    sim = meta["simulation"]
    banner = [
        "",
        "**SIMULATED** by `python -m faser_sgl.sim` (faser_sgl/sim/, docs/simulation.md): the real "
        "planner and policies on a virtual clock; pass times from the cost profile, acceptance from "
        "the acceptance model. Not measured on a server. Validation against real-server runs: pending.",
        "",
        f"- Cost profile: {sim['cost_profile']['name']} ({sim['cost_profile']['machine']})",
        *(f"- Cost profile of {n}: {p['name']} ({p['machine']})" for n, p in sim.get("cost_profile_for", {}).items()),
        f"- Acceptance: {sim['acceptance']}",
        f"- Early-exit scores: {sim['exit_records']}; pass-time jitter (CV): {sim['cost_noise']}",
    ]
    if lines and lines[0].startswith("# "):
        lines[0] += " (SIMULATED)"
    # The harness's own provenance line would name the wrong program.
    lines = [line for line in lines if not line.startswith("Generated by `python -m faser_sgl.bench`")]
    text = "\n".join(lines[:1] + banner + lines[1:]).replace("n/a (sampling)", "n/a (sim)")
    report_path.write_text(text + ("\n" if not text.endswith("\n") else ""))


def write_outputs(args, meta: dict, results: list[dict]) -> dict[str, Path]:
    files = report.write_all(args.output_dir, args.report, meta, results)
    mark_simulated(args.report, meta)
    return files


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    if args.report_only:
        meta, results = report.read_json(args.output_dir / "results.json")
    else:
        meta, results = simulate(args, argv)
    files = write_outputs(args, meta, results)
    lines = report.headline(results, meta["baseline"]) or ["(only the baseline ran)"]
    print("\n".join(["[sim] wrote " + ", ".join(str(p) for p in files.values()), *lines]))
    return files

