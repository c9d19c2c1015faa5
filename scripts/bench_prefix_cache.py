"""Benchmark: the radix prefix cache on vs off (--disable-radix-cache), against a real server.

    python scripts/bench_prefix_cache.py [--model-path DIR] [--extra-args "SERVER ARGS"]
        [--rounds 3] [--branches 4] [--doc-tokens 600] [--conversations 3] [--turns 4]
        [--system-tokens 300] [--user-tokens 40] [--new-tokens 16] [--out results.json]

One server per cache setting (same model, same --extra-args), each running two workloads in turn:
  fork/join   an SGLang program that forks: the shared prefix (document + instruction) is sent once
              with max_new_tokens=0, as sglang's fork does to cache it, then --branches requests
              (prefix + a different question) go concurrently; --rounds different documents.
  multi-turn  --conversations conversations, one after another, of --turns sequential turns; each
              turn sends the whole conversation so far (system prompt, user turns, the outputs as
              returned) plus a new user message.
Greedy, ignore_eos, seeded text: token counts matter, not meaning.  TTFT is the time to the first
streamed data line; e2e is the workload's wall clock.  cached/prompt tokens sum meta_info over
every response (0 cached with the cache off).  Prints a markdown table with off/on ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from faser_sgl import default_models
from faser_sgl.bench.server_process import start_server

WORDS = ("the system reads each request and then writes a short answer about data model cache "
         "token server batch memory layer value graph input output stream queue thread time "
         "network error result string number file table index query user agent program").split()
QUESTION_TOKENS = 12  # a fork's branch adds only a short question to the shared prefix


def machine_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), "unknown CPU")
    # Taken before any server starts: a high load says something else shares the CPUs.
    return f"{model}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"


def make_text(tok, rng: random.Random, n_tokens: int) -> str:
    """Seeded words cut to ``n_tokens`` of the served model's tokenizer (re-encoding the decoded
    text may differ by a token or so at the cut: close enough, the same for both settings)."""
    ids = tok.encode(" ".join(rng.choices(WORDS, k=2 * n_tokens + 8)), add_special_tokens=False)
    return tok.decode(ids[:n_tokens]).strip()


def generate(base_url: str, text: str, new_tokens: int) -> dict:
    """One /generate; streamed unless new_tokens is 0 (nothing to stream: it only fills the cache).
    Returns the TTFT (None without tokens), latency, final text and meta_info."""
    body = {"text": text, "stream": new_tokens > 0,
            "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}}
    start = time.perf_counter()
    ttft, last = None, None
    with requests.post(f"{base_url}/generate", json=body, stream=True, timeout=1800) as r:
        if r.status_code != 200:
            raise RuntimeError(f"/generate answered {r.status_code}: {r.text[:500]}")
        if new_tokens == 0:
            last = r.json()
        else:
            for line in r.iter_lines(decode_unicode=True):  # SGLang's "data: {json}" lines
                if not line or not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                if ttft is None:  # the first data line carries the first token
                    ttft = time.perf_counter() - start
                last = json.loads(data)
    if last is None or "error" in last:
        raise RuntimeError(f"/generate failed: {last}")
    # Without --incremental-streaming-output SGLang streams the whole text so far: the last is all.
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - start, "text": last["text"],
            "prompt_tokens": last["meta_info"].get("prompt_tokens", 0),
            "cached_tokens": last["meta_info"].get("cached_tokens", 0)}


def fork_join(base_url: str, tok, args) -> list[dict]:
    # Documents and questions come from a seed of their own: the same for both settings.
    rng = random.Random(1000)
    responses = []
    with ThreadPoolExecutor(args.branches) as pool:
        for rnd in range(args.rounds):
            prefix = (f"Document {rnd}:\n{make_text(tok, rng, args.doc_tokens)}\n\n"
                      "Answer the question about the document above in a few words.\n")
            questions = [make_text(tok, rng, QUESTION_TOKENS) for _ in range(args.branches)]
            responses.append(generate(base_url, prefix, 0))  # the fork: prefill the prefix only
            texts = [f"{prefix}Question {i}: {q}?\nAnswer:" for i, q in enumerate(questions)]
            responses += pool.map(lambda t: generate(base_url, t, args.new_tokens), texts)
    return responses


def multi_turn(base_url: str, tok, args) -> list[dict]:
    rng = random.Random(2000)  # another seed: this workload must not hit fork/join's prefixes
    responses = []
    for conv in range(args.conversations):
        text = f"System ({conv}): {make_text(tok, rng, args.system_tokens)}\n"
        for _ in range(args.turns):
            text += f"\nUser: {make_text(tok, rng, args.user_tokens)}\nAssistant:"
            out = generate(base_url, text, args.new_tokens)
            text += out["text"]  # the next turn resends the answer as returned
            responses.append(out)
    return responses


def summarize(name: str, cache: str, responses: list[dict], e2e: float) -> dict:
    ttfts = [r["ttft_s"] for r in responses if r["ttft_s"] is not None]  # not the fork's prefill
    return {"workload": name, "cache": cache, "e2e_s": e2e,
            "mean_ttft_s": statistics.mean(ttfts), "p50_ttft_s": statistics.median(ttfts),
            "prompt_tokens": sum(r["prompt_tokens"] for r in responses),
            "cached_tokens": sum(r["cached_tokens"] for r in responses),
            "ttfts_s": ttfts, "latencies_s": [r["latency_s"] for r in responses],  # with the fork's prefill
            "outputs": [r["text"] for r in responses if r["ttft_s"] is not None]}


def run_setting(cache: str, tok, args) -> tuple[list[dict], dict]:
    server_args = ["--model-path", args.model_path, *shlex.split(args.extra_args)]
    if cache == "off":
        server_args.append("--disable-radix-cache")
    server = start_server(server_args, args.log_dir, args.server_timeout)
    try:
        # Warm-up with text no workload shares, so first-pass costs land in neither table row.
        generate(server.base_url, make_text(tok, random.Random(3000), args.doc_tokens), args.new_tokens)
        results = []
        for name, workload in (("fork/join", fork_join), ("multi-turn", multi_turn)):
            start = time.perf_counter()
            responses = workload(server.base_url, tok, args)
            results.append(summarize(name, cache, responses, time.perf_counter() - start))
        return results, server.internal_state()
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=default_models.default_target_path(),
                    help="default: the embedded target (python -m faser_sgl.default_models)")
    ap.add_argument("--extra-args", default="", help="more server arguments, e.g. "
                    '"--speculative-policy faser --speculative-draft-model-path DIR"')
    ap.add_argument("--cache", nargs="+", choices=["on", "off"], default=["on", "off"],
                    help="settings to run (ratios need both)")
    ap.add_argument("--rounds", type=int, default=3, help="fork/join: documents")
    ap.add_argument("--branches", type=int, default=4, help="fork/join: concurrent branches")
    ap.add_argument("--doc-tokens", type=int, default=600, help="fork/join: document length")
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=300, help="multi-turn: system prompt length")
    ap.add_argument("--user-tokens", type=int, default=40, help="multi-turn: each user message")
    ap.add_argument("--new-tokens", type=int, default=16, help="output tokens per request")
    ap.add_argument("--server-timeout", type=float, default=900.0)
    ap.add_argument("--log-dir", type=Path, default=Path("bench_results/prefix_cache_logs"))
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    machine = machine_name()
    tok = AutoTokenizer.from_pretrained(args.model_path)  # to size the prompts in its tokens
    results, states = [], {}
    for cache in dict.fromkeys(args.cache):  # once each: the ratios pair one run of each
        rows, states[cache] = run_setting(cache, tok, args)
        results += rows

    print(f"\n# faser_sgl prefix cache benchmark: {machine}\n\n"
          f"{' '.join([args.model_path, args.extra_args]).strip()}; greedy, {args.new_tokens} new "
          f"tokens per request; fork/join: {args.rounds} x (prefix + {args.branches} branches), "
          f"{args.doc_tokens}-token documents; multi-turn: {args.conversations} x {args.turns} turns, "
          f"{args.system_tokens}-token system prompt\n")
    print("| workload | cache | mean TTFT (s) | p50 TTFT (s) | e2e (s) | cached/prompt tokens |")
    print("|---|---|---|---|---|---|")
    for r in results:
        share = r["cached_tokens"] / r["prompt_tokens"] if r["prompt_tokens"] else 0.0
        print(f"| {r['workload']} | {r['cache']} | {r['mean_ttft_s']:.3f} | {r['p50_ttft_s']:.3f} | "
              f"{r['e2e_s']:.2f} | {r['cached_tokens']}/{r['prompt_tokens']} ({share:.0%}) |")
    ratios = {}
    by_key = {(r["workload"], r["cache"]): r for r in results}
    for name in ("fork/join", "multi-turn"):
        on, off = by_key.get((name, "on")), by_key.get((name, "off"))
        if on and off:
            rt = ratios[name] = {
                "mean_ttft": off["mean_ttft_s"] / on["mean_ttft_s"], "e2e": off["e2e_s"] / on["e2e_s"],
                # Greedy: the cache must not change what is generated.
                "identical_outputs": sum(a == b for a, b in zip(on["outputs"], off["outputs"])),
                "num_outputs": len(on["outputs"])}
            print(f"| {name} | off/on | {rt['mean_ttft']:.2f}x | - | {rt['e2e']:.2f}x | - |")
    print()
    for name, rt in ratios.items():
        print(f"{name}: outputs identical, cache on vs off: {rt['identical_outputs']}/{rt['num_outputs']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                  "results": results, "ratios": ratios, "server_states": states}
        args.out.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
