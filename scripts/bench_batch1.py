"""Batch-1 side by side, in one process: Hugging Face transformers (target alone, and assisted
generation with the draft) against faser_sgl (none, fixed K, adaptive), on the embedded pair.

    python scripts/bench_batch1.py [--new-tokens 48] [--num-prompts 6] [--ks 2 4]

float32, greedy, one request at a time; every output is compared with HF's target-alone output
(token-identical is the lossless check).  HF runs first and is freed before faser_sgl loads, so
the two never share memory.  tokens/s counts every generated token over the wall time of all
prompts; ratios are against HF target alone.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time

import torch

from faser_sgl import default_models
from faser_sgl.bench.chat_prompts import CHAT_PROMPTS, chat_prompt_ids

# The six prompts of the run in docs/benchmarks.md (the shared list without two of its entries).
BATCH1_PROMPTS = [CHAT_PROMPTS[i] for i in (0, 1, 2, 3, 4, 6)]


def hf_runs(target: str, draft: str, prompts, new_tokens: int, ks):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    assistant = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()

    def generate(prompt, **kw):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)
        return out[0, len(prompt):].tolist()

    results = []
    configs = [("HF target alone", {})] + [
        (f"HF assisted K={k}", {"assistant_model": assistant, "num_assistant_tokens": k,
                                "num_assistant_tokens_schedule": "constant",
                                "assistant_confidence_threshold": 0.0}) for k in ks]
    with torch.inference_mode():
        generate(prompts[0][:8])  # warm-up
        for name, kw in configs:
            start = time.perf_counter()
            outs = [generate(p, **kw) for p in prompts]
            results.append((name, outs, time.perf_counter() - start))
            print(f"  {name}: {sum(map(len, outs)) / results[-1][2]:.2f} tok/s", flush=True)
    del model, assistant
    gc.collect()
    return results


def faser_runs(target: str, draft: str, prompts, new_tokens: int, ks, adaptive_max: int):
    from faser_sgl.managers.token_generator import TargetOnlyGenerator
    from faser_sgl.offline_engine import OfflineEngine
    from faser_sgl.speculative.adaptive import AdaptiveLength
    from faser_sgl.speculative.policy import FixedLength

    from faser_sgl.executor.config import ModelConfig

    engine = OfflineEngine(target, draft, policy="fixed", num_draft_tokens=max(ks + [adaptive_max]),
                           kv_slots=4096, eos_token_ids=ModelConfig.from_pretrained(target).eos_token_ids)
    spec_gen = engine.generator
    plain_gen = TargetOnlyGenerator(engine.runner, engine.sampler, engine.stop_checker)
    configs = [("faser_sgl none", None, None)] + [(f"faser_sgl fixed K={k}", k, False) for k in ks]
    if adaptive_max:
        configs.append((f"faser_sgl adaptive K<={adaptive_max}", adaptive_max, True))
    results = []
    for name, k, adaptive in configs:
        engine.speculative = k is not None
        engine.generator = plain_gen if k is None else spec_gen
        if k is not None:
            spec_gen.policy = AdaptiveLength(k) if adaptive else FixedLength(k)
            spec_gen.calibrate()
            spec_gen.num_verify_steps = spec_gen.num_drafted = spec_gen.num_accepted = 0
        engine.run([engine.make_request(prompts[0][:8], 4, temperature=0)])  # warm-up
        start = time.perf_counter()
        # As HF's min_new_tokens: the model's end tokens are masked until new_tokens exist (a
        # plain ignore_eos would emit them and go on, where HF takes the next best token).
        outs = [engine.run([engine.make_request(p, new_tokens, temperature=0, min_new_tokens=new_tokens)])[0]
                for p in prompts]
        results.append((name, outs, time.perf_counter() - start))
        print(f"  {name}: {sum(map(len, outs)) / results[-1][2]:.2f} tok/s", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--adaptive-max", type=int, default=4)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    target = str(default_models.ensure(default_models.TARGET))
    draft = str(default_models.ensure(default_models.DRAFT))
    tok = AutoTokenizer.from_pretrained(target)
    prompts = chat_prompt_ids(tok, args.num_prompts, BATCH1_PROMPTS)
    print(f"# batch 1: {platform.node()}, {torch.get_num_threads()} threads, float32, greedy, "
          f"{len(prompts)} prompts x {args.new_tokens} new tokens", flush=True)
    results = hf_runs(target, draft, prompts, args.new_tokens, args.ks)
    results += faser_runs(target, draft, prompts, args.new_tokens, args.ks, args.adaptive_max)
    reference, base_tps = results[0][1], None
    print("\n| system | tokens/s | vs HF target alone | outputs identical to HF target alone |")
    print("|---|---|---|---|")
    for name, outs, seconds in results:
        tps = sum(map(len, outs)) / seconds
        base_tps = base_tps or tps
        same = sum(a == b for a, b in zip(outs, reference))
        print(f"| {name} | {tps:.2f} | {tps / base_tps:.2f}x | {same}/{len(outs)} |")


if __name__ == "__main__":
    main()
