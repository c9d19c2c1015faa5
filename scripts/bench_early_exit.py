"""FASER early exit on the embedded pair: how good the exit predictor is, and what it saves.

    python scripts/bench_early_exit.py [--k 4] [--new-tokens 32] [--num-prompts 8]
        [--layers 4,7,10,14,18,21,24,26] [--live 14:2.0 21:1.0] [--concurrency 1 4]

1. Diagnostic run (fixed K, greedy, all prompts at once): verification at full depth, and at
   every layer of ``--layers`` the restricted logit lens scores every draft token still in the
   pass (speculative/early_exit.py).  Each score is labelled with the full-depth verdict, so one
   run evaluates any threshold: per layer and threshold T (prune d_j when an alternative's lens
   logit beats d_j's by more than T), the share of scored drafts it would prune, its precision
   (pruned drafts the target indeed rejects) and recall (first rejections of a run caught).  The
   draft model's own probability of its token (no target work at all) is evaluated the same way.
2. Live runs at each ``--concurrency``: fixed K without early exit, then with each ``--live``
   setting (exit layer(s):threshold), on the same prompts.  Reported: tokens/s, target time per
   verification pass, the exit ratio (draft rows pruned / draft rows verified), time spent in
   the predictor, and whether outputs are identical to the run without early exit.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict

import torch

from faser_sgl import default_models
from faser_sgl.bench.chat_prompts import chat_prompt_ids
from faser_sgl.bench.inprocess import run_at_concurrency
from faser_sgl.offline_engine import OfflineEngine
from faser_sgl.speculative import early_exit
from faser_sgl.speculative.adaptive import AdaptiveLength




def lens_table(records, thresholds: list[float]) -> None:
    by_layer = defaultdict(list)
    for layer, j, margin, prob, rejected, first in records:
        by_layer[layer].append((margin, rejected, first))
    print("| exit layer | T | scored | prunes | precision | recall (first rejections caught) |")
    print("|---|---|---|---|---|---|")
    for layer in sorted(by_layer):
        rows = by_layer[layer]
        firsts = sum(f for _, _, f in rows)
        for t in thresholds:
            hit = [(r, f) for m, r, f in rows if m < -t]
            precision = sum(r for r, _ in hit) / len(hit) if hit else float("nan")
            recall = sum(f for _, f in hit) / firsts if firsts else float("nan")
            print(f"| {layer} | {t:g} | {len(rows)} | {len(hit) / len(rows):.0%} | {precision:.2f} | {recall:.2f} |")


def draft_prob_table(records, cuts: list[float]) -> None:
    # Every draft token is scored once per layer; take one layer's records.
    layer = min(r[0] for r in records)
    rows = [(p, r, f) for l, j, m, p, r, f in records if l == layer and p is not None]
    firsts = sum(f for _, _, f in rows)
    print("| rule | scored | prunes | precision | recall |\n|---|---|---|---|---|")
    for c in cuts:
        hit = [(r, f) for p, r, f in rows if p < c]
        precision = sum(r for r, _ in hit) / len(hit) if hit else float("nan")
        recall = sum(f for _, f in hit) / firsts if firsts else float("nan")
        print(f"| draft prob < {c:g} | {len(rows)} | {len(hit) / len(rows):.0%} | {precision:.2f} | {recall:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--layers", default="4,7,10,14,18,21,24,26")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[-1, 0, 1, 2, 4, 8])
    ap.add_argument("--live", nargs="*", default=["14,21:0:0.5", "14,21:0:0.5:cost", "14,21:auto:0.5",
                                                  "14,21:auto:0.5:cost", "24:0:1.0"],
                    help="live settings LAYERS:THRESHOLD:DRAFT_PROB[:cost] (layers comma-separated; "
                         "THRESHOLD a number or auto (online calibration, DRAFT_PROB unused); "
                         "cost: prune only where the calibrated cost model says it pays)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--records-out", default=None, help="write the diagnostic records here (JSON)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    target, draft = default_models.ensure(default_models.TARGET), default_models.ensure(default_models.DRAFT)
    tok = AutoTokenizer.from_pretrained(str(target))
    prompts = chat_prompt_ids(tok, args.num_prompts)
    engine = OfflineEngine(str(target), str(draft), policy="fixed", num_draft_tokens=args.k,
                           kv_slots=16384, eos_token_ids=[tok.eos_token_id])
    gen = engine.generator
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"# early exit on the embedded pair: {platform.node()} ({cpu}), {torch.get_num_threads()} threads, "
          f"float32, greedy, fixed K={args.k}, {len(prompts)} prompts x {args.new_tokens} new tokens\n")

    # 1. Diagnostic: full depth, every score recorded and labelled.
    gen.early_exit = early_exit.make_early_exit(engine.runner, args.layers, diagnostic=True, draft_prob=1.0)
    reference, _ = run_at_concurrency(engine, prompts, args.new_tokens, len(prompts))
    records = gen.early_exit.records
    if args.records_out:
        import json

        with open(args.records_out, "w") as f:
            json.dump({"fields": ["layer", "j", "margin", "draft_prob", "rejected", "first_rejection"],
                       "records": records}, f)
    drafted = sum(1 for r in records if r[0] == min(x[0] for x in records))
    rejected = sum(1 for r in records if r[0] == min(x[0] for x in records) and r[4])
    print(f"## Predictor quality (diagnostic run): {drafted} draft tokens scored, {rejected / drafted:.0%} "
          "rejected at full depth\n")
    lens_table(records, args.thresholds)
    print()
    draft_prob_table(records, [0.1, 0.2, 0.3, 0.5])
    print(flush=True)

    # 2. Live: fixed K without and with early exit.
    target_time, target_calls = defaultdict(float), defaultdict(int)
    real_timed = gen._timed

    def timed(model, feeds, forward, *a):
        start = time.perf_counter()
        out = real_timed(model, feeds, forward, *a)
        target_time[model] += time.perf_counter() - start
        target_calls[model] += 1
        return out

    gen._timed = timed
    settings = [None] + args.live
    print("## Live runs\n")
    print("| concurrency | early exit | tokens/s | vs off | target ms per pass | target passes | "
          "exit ratio | predictor ms per pass | identical to off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for conc in args.concurrency:
        base = None
        for setting in settings:
            if setting is None:
                gen.early_exit = None
            else:
                layers, threshold, draft_prob, *cost = setting.split(":")
                cost_model = None
                if cost:  # the adaptive drafter's cost curves, calibrated on this machine
                    fixed, cost_model = gen.policy, AdaptiveLength(args.k)
                    gen.policy = cost_model
                    gen.calibrate()
                    gen.policy = fixed
                gen.early_exit = early_exit.make_early_exit(engine.runner, layers, threshold,
                                                            draft_prob=float(draft_prob), cost_model=cost_model)
            predictor_s = [0.0]
            if gen.early_exit is not None:
                real_decide = gen.early_exit._decide

                def decide(*a, _real=real_decide):
                    start = time.perf_counter()
                    try:
                        return _real(*a)
                    finally:
                        predictor_s[0] += time.perf_counter() - start
                gen.early_exit._decide = decide
            target_time.clear()
            target_calls.clear()
            outs, tps = run_at_concurrency(engine, prompts, args.new_tokens, conc)
            passes = target_calls["target"]
            if base is None:
                base = (outs, tps)
            stats = gen.early_exit.stats.as_dict() if gen.early_exit else None
            ratio = f"{stats['exit_ratio']:.0%}" if stats and stats["exit_ratio"] is not None else "-"
            print(f"| {conc} | {setting or 'off'} | {tps:.2f} | {tps / base[1]:.2f}x | "
                  f"{target_time['target'] * 1e3 / max(passes, 1):.0f} | {passes} | {ratio} | "
                  f"{predictor_s[0] * 1e3 / max(passes, 1):.1f} | "
                  f"{sum(a == b for a, b in zip(outs, base[0]))}/{len(outs)} |", flush=True)
    print(f"\n(diagnostic reference identical to the live run without early exit: "
          f"{sum(a == b for a, b in zip(reference, base[0]))}/{len(reference)})")


if __name__ == "__main__":
    main()
