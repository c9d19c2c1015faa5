"""What a speculative step costs when nobody drafts, against a step of `none` (issue 25, item 2).

    python scripts/bench_plain_step.py [--batches 1,4,16] [--new-tokens 24] [--repeats 3]

One process, the embedded pair, float32, greedy.  The adaptive policy runs on a cost profile on
which drafting never pays, so every request drafts nothing; three modes decode the same requests:
- none: the speculation-free generator on the same runner (what --speculative-policy none runs);
- k0-plain: the speculative generator as shipped (a step without drafts is a plain step);
- k0-former: the same with PLAIN_STEPS off, i.e. the former path (verification bookkeeping and
  one accept call per request even with k = 0).
Per decode step (prefill steps left out): the wall time of the step and the part outside its
forward passes ("overhead"), medians over every step of every repeat, modes interleaved per
repeat so that machine drift hits them alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from faser_sgl import default_models

NEVER_PAYS = "target=0+10,draft=10+10"  # every row a whole pass: drafting never pays


def prompt_ids(engine, n: int) -> list[list[int]]:
    tok = engine.stop_checker.tokenizer
    texts = [f"def function_{i}(x):\n    \"\"\"Return x plus {i}, written out step by step.\"\"\"\n" for i in range(n)]
    return [tok.encode(t) for t in texts] if tok is not None else [[100 + i, 200, 300 + i] for i in range(n)]


def run_mode(engine, generator, prompts, new_tokens: int) -> list[tuple[float, float]]:
    """(wall, seconds outside passes) of each decode step."""
    passes: list[tuple[str, int, float]] = []
    generator.on_pass = lambda model, tokens, seconds: passes.append((model, tokens, seconds))
    engine.generator = generator
    reqs = [engine.make_request(p, new_tokens, temperature=0, ignore_eos=True) for p in prompts]
    for r in reqs:
        engine.planner.add(r)
    steps = []
    while engine.planner.has_work():
        passes.clear()
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        target_tokens = sum(t for m, t, _ in passes if m == "target")
        if passes and target_tokens <= len(prompts) and all(m == "target" for m, _, _ in passes):
            steps.append((wall, wall - sum(s for _, _, s in passes)))
    assert all(len(r.output_ids) == new_tokens for r in reqs)
    return steps, [r.output_ids for r in reqs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from faser_sgl.managers.token_generator import TargetOnlyGenerator
    from faser_sgl.offline_engine import OfflineEngine
    from faser_sgl.speculative.spec_generator import SpeculativeGenerator

    target = str(default_models.ensure(default_models.TARGET))
    draft = str(default_models.ensure(default_models.DRAFT))
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    engine = OfflineEngine(target, draft, policy="adaptive", num_draft_tokens=4, cost_profile=NEVER_PAYS,
                           frontier_size=0, kv_slots=8192, max_running=64,
                           tokenizer=AutoTokenizer.from_pretrained(target))
    speculative = engine.generator
    none = TargetOnlyGenerator(engine.runner, engine.sampler, engine.stop_checker)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; pair: {target} + {draft}", flush=True)
    print("| batch | mode | decode steps | step wall ms, median (min-max) | outside passes ms, median (min-max) |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = prompt_ids(engine, batch)
        results = {"none": [], "k0-plain": [], "k0-former": []}
        outputs = {}
        for _ in range(args.repeats):
            for mode in results:
                SpeculativeGenerator.PLAIN_STEPS = mode != "k0-former"
                steps, outs = run_mode(engine, none if mode == "none" else speculative, prompts, args.new_tokens)
                results[mode] += steps
                outputs.setdefault(mode, outs)
        SpeculativeGenerator.PLAIN_STEPS = True
        assert outputs["none"] == outputs["k0-plain"] == outputs["k0-former"], "outputs differ"
        assert speculative.num_drafted == 0, "a request drafted"
        for mode, steps in results.items():
            walls = [w * 1e3 for w, _ in steps]
            outside = [o * 1e3 for _, o in steps]
            print(f"| {batch} | {mode} | {len(steps)} | {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) "
                  f"| {statistics.median(outside):.2f} ({min(outside):.2f}-{max(outside):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
