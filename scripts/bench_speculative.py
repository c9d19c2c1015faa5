"""Benchmark: no speculation vs the fixed-K draft-then-verify baseline, the adaptive
per-request drafter and FASER (adaptive + early exit), in-process.

    python scripts/bench_speculative.py [--dtype float32] [--new-tokens 64] [--ks 2 4 6]
                                        [--adaptive-max 4] [--concurrency 1 8] [--no-faser]

Runs the scheduler's own planner/generator code (faser_sgl.offline_engine) on the embedded
Qwen2.5-Coder pair, greedy, at concurrency 1 and 8, and prints tokens/s, the ratio to no
speculation, the mean acceptance length (tokens emitted per verification pass) and how many
outputs are token-identical to no speculation.  One model load serves every configuration.
"""

from __future__ import annotations

import argparse
import platform

import torch

from faser_sgl import default_models
from faser_sgl.bench.chat_prompts import chat_prompt_ids
from faser_sgl.bench.inprocess import run_at_concurrency
from faser_sgl.managers.token_generator import TargetOnlyGenerator
from faser_sgl.offline_engine import OfflineEngine
from faser_sgl.speculative.adaptive import AdaptiveLength
from faser_sgl.speculative.early_exit import make_early_exit
from faser_sgl.speculative.policy import FixedLength
from faser_sgl.speculative.spec_generator import SpeculativeGenerator



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
    args = ap.parse_args()

    from transformers import AutoTokenizer

    target, draft = default_models.ensure(default_models.TARGET), default_models.ensure(default_models.DRAFT)
    tok = AutoTokenizer.from_pretrained(str(target))
    prompts = chat_prompt_ids(tok, args.num_prompts)
    dtype = getattr(torch, args.dtype)
    engine = OfflineEngine(str(target), str(draft), policy="fixed",
                           num_draft_tokens=max(args.ks + [args.adaptive_max]),
                           dtype=dtype, kv_slots=16384, eos_token_ids=[tok.eos_token_id])
    spec_gen: SpeculativeGenerator = engine.generator
    plain_gen = TargetOnlyGenerator(engine.runner, engine.sampler, engine.stop_checker)

    def use(k: int | None, adaptive: bool = False, faser: bool = False):
        engine.speculative = k is not None
        engine.generator = spec_gen if k is not None else plain_gen
        if k is not None:
            engine.num_draft_tokens = k
            spec_gen.policy = AdaptiveLength(k) if adaptive else FixedLength(k)
            spec_gen.early_exit = make_early_exit(engine.runner, cost_model=spec_gen.policy) if faser else None
            spec_gen.calibrate()  # what the server does at start for a cost-aware policy
            spec_gen.num_verify_steps = spec_gen.num_drafted = spec_gen.num_accepted = 0

    use(None)
    run_at_concurrency(engine, prompts[:2], 8, 2)  # warm-up
    print(f"# faser_sgl speculative benchmark: {platform.node()}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, greedy, {len(prompts)} prompts x {args.new_tokens} new tokens "
          f"(eos may stop earlier)\n")
    print("| concurrency | policy | tokens/s | vs none | mean accept length | identical to none | "
          "draft rows pruned |")
    print("|---|---|---|---|---|---|---|")
    for conc in args.concurrency:
        use(None)
        base_out, base_tps = run_at_concurrency(engine, prompts, args.new_tokens, conc)
        print(f"| {conc} | none | {base_tps:.2f} | 1.00x | - | - | - |", flush=True)
        runs = [(k, False, False, f"fixed K={k}") for k in args.ks]
        if args.adaptive_max:
            runs.append((args.adaptive_max, True, False, f"adaptive K<={args.adaptive_max}"))
            if not args.no_faser:
                runs.append((args.adaptive_max, True, True, f"faser K<={args.adaptive_max}"))
        for k, adaptive, faser, name in runs:
            use(k, adaptive, faser)
            out, tps = run_at_concurrency(engine, prompts, args.new_tokens, conc)
            steps = spec_gen.num_verify_steps
            accept = (spec_gen.num_accepted + steps) / steps if steps else float("nan")
            same = sum(a == b for a, b in zip(out, base_out))
            pruned = "-"
            if spec_gen.early_exit is not None:
                ratio = spec_gen.early_exit.stats.as_dict()["exit_ratio"]
                pruned = "none drafted" if ratio is None else f"{ratio:.0%}"
            print(f"| {conc} | {name} | {tps:.2f} | {tps / base_tps:.2f}x | {accept:.2f} | "
                  f"{same}/{len(out)} | {pruned} |", flush=True)


if __name__ == "__main__":
    main()
