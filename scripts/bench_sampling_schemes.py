"""Benchmark: acceptance of drafts under the two sampling schemes, on the embedded pair.

    python scripts/bench_sampling_schemes.py [--temperatures 0.7 1.0] [--ks 2 4] [--new-tokens 32]

``rejection``: standard speculative rejection sampling (a draft x is accepted with probability
min(1, p(x)/q(x)), per-position acceptance 1 - TV(p, q), the most any lossless scheme gets).
``coupled``: Gumbel-max with noise of (seed, output position) for both models, a draft accepted
when it equals the target's pick (faser_sgl/kernels/coupled.py): the text is the same for every
K, batch and policy, at some cost in acceptance.  Both are run on the same seeded requests, in
process (faser_sgl.offline_engine), float32, at one concurrency; the table gives the draft
acceptance rate, tokens per verification pass and tokens/s of each, and whether the coupled
text equals target-only coupled sampling of the same seeds.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from faser_sgl import default_models
from faser_sgl.bench.chat_prompts import chat_prompt_ids
from faser_sgl.offline_engine import OfflineEngine

def run(engine: OfflineEngine, prompts, scheme: str, temperature: float, new_tokens: int):
    engine.sampling_scheme = scheme
    gen = engine.generator
    if hasattr(gen, "num_verify_steps"):
        gen.num_verify_steps = gen.num_drafted = gen.num_accepted = 0
    reqs = [engine.make_request(p, new_tokens, temperature=temperature, top_p=0.95, sampling_seed=100 + i)
            for i, p in enumerate(prompts)]
    start = time.perf_counter()
    outs = engine.run(reqs)
    elapsed = time.perf_counter() - start
    return outs, sum(map(len, outs)) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=8)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    target, draft = default_models.ensure(default_models.TARGET), default_models.ensure(default_models.DRAFT)
    tok = AutoTokenizer.from_pretrained(str(target))
    prompts = chat_prompt_ids(tok, args.num_prompts)
    engine = OfflineEngine(str(target), str(draft), policy="fixed", num_draft_tokens=max(args.ks),
                           kv_slots=16384, eos_token_ids=[tok.eos_token_id])
    plain = OfflineEngine(str(target), None, kv_slots=4096, eos_token_ids=[tok.eos_token_id])
    print(f"# sampling schemes: {platform.node()}, {torch.get_num_threads()} threads, float32, "
          f"{len(prompts)} seeded prompts x {args.new_tokens} new tokens, top_p 0.95, all at once\n")
    print("| temperature | K | scheme | draft acceptance | tokens per pass | tokens/s | text = target-only coupled |")
    print("|---|---|---|---|---|---|---|")
    for temp in args.temperatures:
        reference, _ = run(plain, prompts, "coupled", temp, args.new_tokens)
        for k in args.ks:
            engine.policy.k = k  # the planner keeps headroom for max(ks)
            for scheme in ("rejection", "coupled"):
                outs, tps = run(engine, prompts, scheme, temp, args.new_tokens)
                gen = engine.generator
                rate = gen.num_accepted / max(gen.num_drafted, 1)
                per_pass = (gen.num_accepted + gen.num_verify_steps) / max(gen.num_verify_steps, 1)
                same = f"{sum(a == b for a, b in zip(outs, reference))}/{len(outs)}" if scheme == "coupled" else "-"
                print(f"| {temp} | {k} | {scheme} | {rate:.3f} | {per_pass:.2f} | {tps:.2f} | {same} |",
                      flush=True)


if __name__ == "__main__":
    main()
