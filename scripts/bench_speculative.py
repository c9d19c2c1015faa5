"""Benchmark: no speculation vs the fixed-K draft-then-verify baseline, the adaptive
per-request drafter, FASER (adaptive + early exit) and FASER with its frontier pipeline,
in-process.

    python scripts/bench_speculative.py [--dtype float32] [--new-tokens 64] [--ks 2 4 6]
                                        [--adaptive-max 4] [--concurrency 1 8] [--no-faser]
                                        [--frontier-sizes auto 2]

Runs the scheduler's own planner/generator code (faser_sgl.offline_engine) on the embedded
Qwen2.5-Coder pair, greedy, and prints per concurrency tokens/s, mean and p99 request latency,
the ratios to no speculation, the mean acceptance length (tokens emitted per verification pass)
and how many outputs are token-identical to no speculation.  With --frontier-sizes, FASER also
runs with the pipeline ('auto': the controller chooses per step; n: frontiers of n), and the
measured pass costs on the whole machine and on each side of each core split are printed.
One model load serves every configuration.
"""

from __future__ import annotations

import argparse
import platform

import torch

from faser_sgl import default_models
from faser_sgl.bench.chat_prompts import chat_prompt_ids
from faser_sgl.bench.inprocess import run_at_concurrency, run_measured
from faser_sgl.managers.token_generator import TargetOnlyGenerator
from faser_sgl.offline_engine import OfflineEngine
from faser_sgl.speculative.adaptive import AdaptiveLength
from faser_sgl.speculative.early_exit import make_early_exit
from faser_sgl.speculative.frontier import FrontierGenerator, parse_frontier_size
from faser_sgl.speculative.policy import FixedLength



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # float32 by default: on CPUs without AVX-512 BF16/AMX (this project's AMD EPYC machines) torch
    # emulates bf16 GEMMs, whose cost then grows linearly with the tokens per pass.
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--adaptive-max", type=int, default=4,
                    help="also run the adaptive policy with at most this many drafts (0: skip)")
    ap.add_argument("--no-faser", action="store_true",
                    help="skip FASER (the adaptive policy + early exit, default exit options)")
    ap.add_argument("--frontier-sizes", nargs="*", default=[],
                    help="also run FASER with the frontier pipeline: 'auto' and/or frontier sizes")
    args = ap.parse_args()
    sizes = [parse_frontier_size(x) for x in args.frontier_sizes]

    from transformers import AutoTokenizer

    target, draft = default_models.ensure(default_models.TARGET), default_models.ensure(default_models.DRAFT)
    tok = AutoTokenizer.from_pretrained(str(target))
    prompts = chat_prompt_ids(tok, args.num_prompts)
    dtype = getattr(torch, args.dtype)
    engine = OfflineEngine(str(target), str(draft), policy="fixed",
                           num_draft_tokens=max(args.ks + [args.adaptive_max]),
                           dtype=dtype, kv_slots=16384, eos_token_ids=[tok.eos_token_id],
                           frontier_size=None if sizes else 0)
    spec_gen = engine.generator
    plain_gen = TargetOnlyGenerator(engine.runner, engine.sampler, engine.stop_checker)

    def use(k: int | None, adaptive: bool = False, faser: bool = False, frontier: int | None = 0):
        engine.speculative = k is not None
        engine.generator = spec_gen if k is not None else plain_gen
        if k is not None:
            engine.num_draft_tokens = k
            spec_gen.policy = AdaptiveLength(k) if adaptive else FixedLength(k)
            spec_gen.early_exit = make_early_exit(engine.runner, cost_model=spec_gen.policy) if faser else None
            if isinstance(spec_gen, FrontierGenerator):
                spec_gen.controller.enabled = frontier != 0
                spec_gen.controller.pinned_size = frontier
                spec_gen.controller.choices.clear()
            spec_gen.calibrate()  # what the server does at start for a cost-aware policy
            spec_gen.num_verify_steps = spec_gen.num_drafted = spec_gen.num_accepted = 0

    use(None)
    run_at_concurrency(engine, prompts[:2], 8, 2)  # warm-up
    print(f"# faser_sgl speculative benchmark: {platform.node()}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, greedy, {len(prompts)} prompts x {args.new_tokens} new tokens "
          f"(eos may stop earlier)\n")
    print("| concurrency | policy | tokens/s | vs none | mean latency s | none / it | p99 latency s | "
          "none / it | mean accept length | identical to none | draft rows pruned | steps pipelined |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for conc in args.concurrency:
        use(None)
        base = run_measured(engine, prompts, args.new_tokens, conc)
        base_out, base_tps = base.outputs, base.tokens_per_s
        print(f"| {conc} | none | {base_tps:.2f} | 1.00x | {base.mean_latency:.1f} | 1.00x | "
              f"{base.p99_latency:.1f} | 1.00x | - | - | - | - |", flush=True)
        runs = [(k, False, False, 0, f"fixed K={k}") for k in args.ks]
        if args.adaptive_max:
            runs.append((args.adaptive_max, True, False, 0, f"adaptive K<={args.adaptive_max}"))
            if not args.no_faser:
                runs.append((args.adaptive_max, True, True, 0, f"faser K<={args.adaptive_max}"))
                runs += [(args.adaptive_max, True, True, f, f"faser K<={args.adaptive_max} + pipeline "
                          f"F={'auto' if f is None else f}") for f in sizes]
        for k, adaptive, faser, frontier, name in runs:
            use(k, adaptive, faser, frontier)
            pipelined_before = getattr(spec_gen, "num_pipelined_steps", 0)
            run = run_measured(engine, prompts, args.new_tokens, conc)
            out, tps = run.outputs, run.tokens_per_s
            pipelined = getattr(spec_gen, "num_pipelined_steps", 0) - pipelined_before
            steps = spec_gen.num_verify_steps
            accept = (spec_gen.num_accepted + steps) / steps if steps else float("nan")
            same = sum(a == b for a, b in zip(out, base_out))
            pruned = "-"
            if spec_gen.early_exit is not None:
                ratio = spec_gen.early_exit.stats.as_dict()["exit_ratio"]
                pruned = "none drafted" if ratio is None else f"{ratio:.0%}"
            print(f"| {conc} | {name} | {tps:.2f} | {tps / base_tps:.2f}x | {run.mean_latency:.1f} | "
                  f"{base.mean_latency / run.mean_latency:.2f}x | {run.p99_latency:.1f} | "
                  f"{base.p99_latency / run.p99_latency:.2f}x | {accept:.2f} | "
                  f"{same}/{len(out)} | {pruned} | {pipelined} |", flush=True)
    if isinstance(spec_gen, FrontierGenerator):
        print("\nMeasured pass costs (ms) after the runs:\n")
        print("| where | target pass, 1 2 3 4 5 rows | draft pass, 1 2 4 8 rows |")
        print("|---|---|---|")
        for line in spec_gen.controller.cost_table():
            print(line)


if __name__ == "__main__":
    main()
