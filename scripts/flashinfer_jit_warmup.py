"""Build FlashInfer's JIT prefill module for some head dims before the GPU check's tests need it.

    python scripts/flashinfer_jit_warmup.py 64 128 [--dtype bfloat16]

One process per head dim, started together, so the cold nvcc builds overlap (each is one ninja
run over a module's ~10 sources); each prints one JSON line: head dim, dtype, the kernel family
FlashInfer used (FASER_SGL_FLASHINFER_BACKEND pins it; gpu_check.sh pins fa2) and the seconds
its first plan + run took, which on a machine without FlashInfer's JIT cache is the cold compile.
The tests and the profiler then load the cached modules (~/.cache/flashinfer) in seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def warm(head_dim: int, dtype_name: str) -> dict:
    import torch

    from faser_sgl.executor.attention import create_backend
    from faser_sgl.executor.forward_batch import ForwardBatch
    from faser_sgl.executor.kv_cache import KVCache

    dtype = getattr(torch, dtype_name)
    heads, kv_heads, slots = 4, 2, 64
    attn = create_backend("flashinfer", heads, kv_heads, head_dim, dtype=dtype, device="cuda")
    cache = KVCache(1, slots, kv_heads, head_dim, dtype, "cuda")
    batch = ForwardBatch.build([[1] * 5, [2] * 3], [list(range(5)), list(range(8, 11))], [[], []]).to("cuda")
    q = torch.randn(8, heads, head_dim, dtype=dtype, device="cuda")
    k = torch.randn(8, kv_heads, head_dim, dtype=dtype, device="cuda")
    t0 = time.perf_counter()
    attn.begin_forward(batch)
    attn.forward(0, q, k, k.clone(), cache, batch)
    torch.cuda.synchronize()
    return {"head_dim": head_dim, "dtype": dtype_name, "backend": attn.kernel_backend,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("head_dims", nargs="+", type=int)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        try:
            print(json.dumps(warm(args.head_dims[0], args.dtype)), flush=True)
            return 0
        except Exception as err:  # noqa: BLE001 - reported as the result line
            print(json.dumps({"head_dim": args.head_dims[0], "dtype": args.dtype,
                              "error": f"{type(err).__name__}: {err}"[-2000:]}), flush=True)
            return 1
    children = [subprocess.Popen([sys.executable, __file__, str(d), "--dtype", args.dtype, "--one"])
                for d in args.head_dims]
    return max(c.wait() for c in children)


if __name__ == "__main__":
    sys.exit(main())
