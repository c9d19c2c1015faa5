"""Write the simulator's GPU cost profiles that are DERIVED ON PAPER (rooflines, not measured).

    PYTHONPATH=. .venv/bin/python scripts/roofline_profiles.py [--check]

writes faser_sgl/sim/profiles/{h100,h200}_roofline_qwen3_32b.json (one GPU) and
h100x4_tp4_roofline_qwen3_32b.json (Qwen3-32B tensor-parallel over 4 H100 SXM, the FASER
paper's kind of deployment); ``--check`` only compares them with the files.  Every number's
derivation is written into the profile's "sources".  The one-GPU profiles' pass curves are the
ones they had before the context term was added (same points, same formula); this script adds
their ``per_context_token_us`` and regenerates them.

Model: a pass costs
    launch + all-reduces + max(weights per GPU / (0.8 x HBM bandwidth),
                               tokens x 2 x params per GPU / (0.6 x dense bf16 FLOP/s))
    + per_context_token_us x context
where context is the KV tokens the pass's attention reads (cost_profile.py), each costing its
KV bytes per GPU at 0.8 x HBM bandwidth.  Tensor parallelism over G GPUs splits weights, FLOPs
and KV heads G ways and adds 2 all-reduces per layer (after attention and after the MLP), each
a latency plus its message (tokens x hidden x 2 bytes) over the effective all-reduce bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parents[1] / "faser_sgl" / "sim" / "profiles"

BW_EFF, FLOP_EFF = 0.8, 0.6
GPUS = {
    "H100 SXM": {"hbm_Bps": 3.35e12, "bf16_flops": 989e12, "sms": 132, "mem_bytes": 80e9},
    "H200": {"hbm_Bps": 4.8e12, "bf16_flops": 989e12, "sms": 132, "mem_bytes": 141e9},
}
# Public model cards / config.json (Qwen/Qwen3-32B, Qwen/Qwen3-0.6B).
MODELS = {
    "target": {"name": "Qwen3-32B", "params": 32.8e9, "layers": 64, "hidden": 5120, "kv_heads": 8,
               "head_dim": 128, "q_heads": 64, "launch_ms": 1.0},
    "draft": {"name": "Qwen3-0.6B", "params": 0.6e9, "layers": 28, "hidden": 1024, "kv_heads": 8,
              "head_dim": 128, "q_heads": 16, "launch_ms": 1.5},
}
BYTES = 2  # bf16
# NVLink 4 all-reduce over 4 H100 SXM: ~10 us per call for small messages; NCCL's bus bandwidth
# ~450 GB/s for large ones, i.e. an algorithm bandwidth of 450 x n / (2 (n - 1)) = 300 GB/s at
# n = 4 (a ring moves 2 (n - 1) / n of the message per GPU).
ALLREDUCE_LATENCY_S = 10e-6
ALLREDUCE_BPS = 300e9
ONE_GPU_SIZES = [1, 8, 32, 64, 128, 192, 256, 384, 512, 1024, 2048, 4096]
TP_SIZES = [1, 8, 32, 64, 128, 192, 221, 256, 384, 512, 1024, 2048, 4096, 8192, 16384]
SPLIT_DRAFT_SMS = (32, 64)  # lanes.make_splits on a 132-SM GPU (multiples of 8)


def kv_bytes_per_token(m: dict) -> int:
    return 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * BYTES  # K and V, every layer


def allreduce_s(m: dict, tokens: float, tp: int) -> float:
    if tp == 1:
        return 0.0
    return 2 * m["layers"] * (ALLREDUCE_LATENCY_S + tokens * m["hidden"] * BYTES / ALLREDUCE_BPS)


def roofline_s(m: dict, gpu: dict, tokens: float, tp: int, share: float = 1.0) -> float:
    """The weights-or-FLOPs part on a GPU share ``share`` (green-context split: that share of
    the SMs and, while both sides stream, of the HBM bandwidth)."""
    weights = m["params"] * BYTES / tp / (BW_EFF * gpu["hbm_Bps"])
    compute = tokens * 2 * m["params"] / tp / (FLOP_EFF * gpu["bf16_flops"])
    return max(weights, compute) / share


def unshared_ms(m: dict, tokens: float, tp: int) -> float:
    """What a split does not divide: kernel launches and all-reduces (NVLink, not SMs)."""
    return m["launch_ms"] + 1e3 * allreduce_s(m, tokens, tp)


def pass_ms(m: dict, gpu: dict, tokens: float, tp: int, share: float = 1.0) -> float:
    whole = round(unshared_ms(m, tokens, tp) + 1e3 * roofline_s(m, gpu, tokens, tp), 3)
    if share == 1.0:
        return whole
    # A split side: the rest of the whole GPU's (rounded) pass, on a share of it.
    rest = unshared_ms(m, tokens, tp)
    return round(rest + (whole - rest) / share, 3)


def per_context_us(m: dict, gpu: dict, tp: int, share: float = 1.0) -> float:
    return round(1e6 * kv_bytes_per_token(m) / tp / (BW_EFF * gpu["hbm_Bps"]) / share, 5)


def curve(m, gpu, sizes, tp, share=1.0) -> dict:
    return {"points": [[n, pass_ms(m, gpu, n, tp, share)] for n in sizes],
            "per_context_token_us": per_context_us(m, gpu, tp, share)}


def splits(gpu: dict, sizes, tp: int) -> list[dict]:
    out = []
    for d in SPLIT_DRAFT_SMS:
        t = gpu["sms"] - d
        out.append({"name": f"cuda:{t}+{d}sm", "draft_share": d,
                    "target": curve(MODELS["target"], gpu, sizes, tp, t / gpu["sms"]),
                    "draft": curve(MODELS["draft"], gpu, sizes, tp, d / gpu["sms"])})
    return out


def context_sources(gpu_name: str, gpu: dict, tp: int) -> str:
    t, d = MODELS["target"], MODELS["draft"]
    attn_s = 4 * t["q_heads"] * t["head_dim"] * t["layers"] / tp / (FLOP_EFF * gpu["bf16_flops"])
    rows = per_context_us(t, gpu, tp) * 1e-6 / attn_s
    chunk = 8192
    prefill_share = chunk * chunk / 2 * attn_s * 1e3 / pass_ms(t, gpu, chunk, tp)
    per_gpu = "" if tp == 1 else f", / {tp} GPUs (each holds {t['kv_heads'] // tp} of the {t['kv_heads']} KV heads)"
    return (f"per_context_token_us = KV bytes per context token per GPU / ({BW_EFF} x {gpu['hbm_Bps'] / 1e12:g} TB/s): "
            f"{t['name']} 2 (K, V) x {t['layers']} layers x {t['kv_heads']} KV heads x {t['head_dim']} x 2 bytes = "
            f"{kv_bytes_per_token(t)} B{per_gpu} -> {per_context_us(t, gpu, tp)} us; "
            f"{d['name']} 2 x {d['layers']} x {d['kv_heads']} x {d['head_dim']} x 2 = {kv_bytes_per_token(d)} B"
            f"{'' if tp == 1 else f' / {tp}'} -> {per_context_us(d, gpu, tp)} us. The attention kernel is its own "
            "memory-bound kernel, so its time adds to the GEMMs'. Context = the KV tokens the pass's attention reads "
            "(each request's cached tokens + the tokens it feeds, summed over the pass). Not modelled: attention "
            f"FLOPs, 4 x {t['q_heads']} q heads x {t['head_dim']} x {t['layers']} layers = "
            f"{4 * t['q_heads'] * t['head_dim'] * t['layers'] / 1e6:.2f} MFLOP per (query row x context token) for the "
            f"target, {1e9 * attn_s:.3f} ns at 60% of the dense rate{'' if tp == 1 else ' split ' + str(tp) + ' ways'}: "
            f"below the KV read's cost up to ~{rows:.0f} query rows per request (GQA 8:1), so a verification (k + 1 "
            "rows) is priced right, but a long prefill chunk's quadratic attention is not (an 8192-token chunk from "
            f"an empty cache: {100 * prefill_share:.0f}% on top of its pass)")


def one_gpu_profile(gpu_name: str, slug: str) -> dict:
    gpu = GPUS[gpu_name]
    t, d = MODELS["target"], MODELS["draft"]
    mem = {"H100 SXM": "3.35 TB/s HBM3", "H200": "4.8 TB/s HBM3e"}[gpu_name]
    kv_total = kv_bytes_per_token(t) + kv_bytes_per_token(d)
    return {
        "name": f"{slug}-roofline-qwen3-32b",
        "units": "ms",
        "machine": (f"DERIVED ON PAPER (roofline), not measured: one NVIDIA {gpu_name} ({mem}, 989 TFLOPS dense "
                    "bf16), bf16, Qwen3-32B-shaped target, Qwen3-0.6B-shaped draft"),
        "target": curve(t, gpu, ONE_GPU_SIZES, 1),
        "draft": curve(d, gpu, ONE_GPU_SIZES, 1),
        "sources": {
            "method": (f"pass time = fixed + max(weights / (0.8 x {gpu['hbm_Bps'] / 1e12:g} TB/s), tokens x 2 x params / "
                       "(0.6 x 989 TFLOPS)) + per_context_token_us x context; weights in bf16 (2 bytes/param); fixed = "
                       "kernel launches per pass (1 ms target, 1.5 ms draft: 28 small layers)"),
            "params": "Qwen3-32B: 32.8e9; Qwen3-0.6B: 0.6e9 (public model cards)",
            "context": context_sources(gpu_name, gpu, 1),
            "kv budget": (f"{gpu['mem_bytes'] / 1e9:g} GB - 65.6 GB target weights - 1.2 GB draft weights leaves "
                          f"{(gpu['mem_bytes'] - 66.8e9) / 1e9:.1f} GB before activations; one KV slot holds both "
                          f"models' KV ({kv_total} B), so at most "
                          f"~{int((gpu['mem_bytes'] - 66.8e9) / kv_total) // 1000}k tokens with no activation margin"),
            "not modelled": ("tensor parallelism, CUDA graphs, the sampler, attention FLOPs (see context); the "
                             "simulator prices passes by token count and context"),
            "splits": ("DERIVED ON PAPER, not measured: green-context SM splits as lanes.make_splits picks them on a "
                       "132-SM GPU (the draft on 32 or 64 SMs, multiples of 8; the target on the rest). A side with a "
                       "share s of the SMs gets s of the compute and, while both sides stream weights, s of the HBM "
                       "bandwidth (requests served fairly per SM), so its pass costs fixed + (whole-GPU pass - fixed) / "
                       "s, and its context term is the whole GPU's / s; the fixed launch time (1 ms target, 1.5 ms "
                       "draft) is not shared. This is pessimistic where the draft side, whose pass is mostly launch "
                       "time, uses less than its share of the bandwidth; a measured profile "
                       "(faser_sgl.sim.gpu_profile's overlap stage, each side timed while the other runs) replaces it"),
            "generated by": "scripts/roofline_profiles.py",
        },
        "splits": splits(gpu, ONE_GPU_SIZES, 1),
    }


def tp4_profile() -> dict:
    gpu, tp = GPUS["H100 SXM"], 4
    t, d = MODELS["target"], MODELS["draft"]
    kv_total = (kv_bytes_per_token(t) + kv_bytes_per_token(d)) // tp
    weights_gpu = (t["params"] + d["params"]) * BYTES / tp
    margin = 8e9
    kv_tokens = int((gpu["mem_bytes"] - weights_gpu - margin) / kv_total)
    ridge = FLOP_EFF * gpu["bf16_flops"] / (BW_EFF * gpu["hbm_Bps"])
    return {
        "name": "h100x4-tp4-roofline-qwen3-32b",
        "units": "ms",
        "machine": ("DERIVED ON PAPER (roofline), not measured: 4 NVIDIA H100 SXM (3.35 TB/s HBM3, 989 TFLOPS dense "
                    "bf16 each, NVLink 4), Qwen3-32B-shaped target and Qwen3-0.6B-shaped draft in bf16, both "
                    "tensor-parallel over the 4 GPUs (TP4)"),
        "target": curve(t, gpu, TP_SIZES, tp),
        "draft": curve(d, gpu, TP_SIZES, tp),
        "sources": {
            "method": ("pass time = launch + 2 x layers x (10 us + tokens x hidden x 2 bytes / 300 GB/s) + "
                       "max(weights / 4 / (0.8 x 3.35 TB/s), tokens x 2 x params / 4 / (0.6 x 989 TFLOPS)) + "
                       "per_context_token_us x context. Each GPU holds a quarter of the weights, does a quarter of "
                       "the FLOPs and holds a quarter of the KV heads; the 4 run in lockstep"),
            "params": ("Qwen3-32B: 32.8e9 params, 64 layers, hidden 5120, 64 q heads, 8 KV heads, head dim 128; "
                       "Qwen3-0.6B: 0.6e9 params (tied embeddings included), 28 layers, hidden 1024, 16 q heads, 8 KV "
                       "heads, head dim 128 (public model cards / config.json)"),
            "target": (f"weights 65.6 GB / 4 = 16.4 GB per GPU -> {1e3 * roofline_s(t, gpu, 1, tp):.3f} ms at 2.68 TB/s; "
                       f"compute {1e6 * 2 * t['params'] / tp / (FLOP_EFF * gpu['bf16_flops']):.2f} us per token per GPU; "
                       f"the two meet at the ridge, {ridge:.0f} tokens per pass (as on one GPU: both split 4 ways); "
                       f"launch 1 ms; all-reduces 2 x 64 = 128 per pass: 1.28 ms latency + "
                       f"{1e6 * 128 * t['hidden'] * BYTES / ALLREDUCE_BPS:.2f} us per token. So a pass of 1..221 tokens "
                       f"costs {pass_ms(t, gpu, 1, tp)}..{pass_ms(t, gpu, 221, tp)} ms (+ context), "
                       f"{pass_ms(t, gpu, 512, tp)} ms at 512 and {pass_ms(t, gpu, 8192, tp)} ms at 8192"),
            "draft": ("placed as SGLang places a standalone draft: the same TP group (TP4 on the same 4 GPUs, the "
                      "draft's KV in the same pool slots). Launch-bound: 1.5 ms launches (28 small layers) + "
                      f"2 x 28 = 56 all-reduces (0.56 ms + {1e6 * 56 * d['hidden'] * BYTES / ALLREDUCE_BPS:.3f} us per "
                      f"token) + max(1.2 GB / 4 at 2.68 TB/s = {1e3 * roofline_s(d, gpu, 1, tp):.3f} ms, compute). "
                      f"So {pass_ms(d, gpu, 1, tp)} ms for 1 row; a draft on one GPU alone (no all-reduces, the whole "
                      "1.2 GB per pass) would cost about 1.95 ms, about the same"),
            "allreduce": ("NVLink 4 all-reduce among 4 H100 SXM: ~10 us per call for the small messages of a decode "
                          "pass; NCCL bus bandwidth ~450 GB/s for large ones = an algorithm bandwidth of "
                          "450 x 4 / (2 x 3) = 300 GB/s. Not overlapped with compute (plain TP as in SGLang/vLLM)"),
            "context": context_sources("H100 SXM", gpu, tp),
            "server settings": (f"KV pool: per GPU 80 GB - {weights_gpu / 1e9:.1f} GB of weights (both models, 1/4 "
                                f"each) - {margin / 1e9:g} GB for activations, CUDA graphs and NCCL buffers = "
                                f"{(gpu['mem_bytes'] - weights_gpu - margin) / 1e9:.1f} GB; one slot holds both models' KV, "
                                f"{kv_total} B per GPU ((262144 + 114688) / 4) -> {kv_tokens} slots, so "
                                f"--max-total-tokens {kv_tokens // 1000 * 1000} --max-running-requests 256 "
                                "--chunked-prefill-size 8192"),
            "not modelled": ("CUDA graphs (the 1 ms / 1.5 ms launch terms stand for them), the sampler, attention "
                             "FLOPs (see context), all-reduce/compute overlap, NVLink contention between the two sides "
                             "of a split"),
            "splits": ("DERIVED ON PAPER, not measured: on each of the 4 GPUs, green-context SM splits as "
                       "lanes.make_splits picks them on a 132-SM GPU (the draft on 32 or 64 SMs; the target on the "
                       "rest), both models still TP4. A side with a share s of the SMs gets s of the compute and of "
                       "the HBM bandwidth: its roofline part (weights or FLOPs) and its context term are the whole "
                       "GPU's / s; the launch time and the all-reduces (NVLink, not SMs) are not shared"),
            "generated by": "scripts/roofline_profiles.py",
        },
        "splits": splits(gpu, TP_SIZES, tp),
    }


def profiles() -> dict[str, dict]:
    return {"h100_roofline_qwen3_32b.json": one_gpu_profile("H100 SXM", "h100"),
            "h200_roofline_qwen3_32b.json": one_gpu_profile("H200", "h200"),
            "h100x4_tp4_roofline_qwen3_32b.json": tp4_profile()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = p.parse_args(argv)
    stale = []
    for name, data in profiles().items():
        text = json.dumps(data, indent=1) + "\n"
        path = PROFILE_DIR / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("differ from scripts/roofline_profiles.py:", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
