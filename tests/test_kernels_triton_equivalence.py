"""Triton accept/reject kernels == torch reference, bit for bit.

Without a GPU the kernels run under Triton's interpreter.  TRITON_INTERPRET must be set before
triton is imported, so that check runs this file as a script in a subprocess and the pytest
process stays untouched.  With CUDA the same comparison runs on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from faser_sgl.kernels import accept_reject as ref
from faser_sgl.kernels import accept_reject_triton as tri


def random_ragged_case(gen: torch.Generator, batch: int, vocab: int, max_k: int, dtype=torch.float32):
    """Ragged batch that exercises rejections, full acceptance, empty residuals (p == q rows whose
    draft token has p = q = 0), zero-probability tokens and extreme uniforms."""
    lengths = torch.randint(0, max_k + 1, (batch,), generator=gen)
    total = int(lengths.sum())
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    req = torch.repeat_interleave(torch.arange(batch), lengths)
    p = torch.softmax(torch.randn(total + batch, vocab, generator=gen) * 3, dim=-1)
    p = torch.where(torch.rand(p.shape, generator=gen) < 0.3, 0.0, p)
    p[:, -1] += 1e-4  # keep every row's mass positive
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(torch.randn(total, vocab, generator=gen) * 3, dim=-1)
    judge_rows = torch.arange(total) + req
    same = torch.rand(total, generator=gen) < 0.3
    q[same] = p[judge_rows][same]
    drafts = torch.multinomial(q, 1, generator=gen).squeeze(1) if total else torch.zeros(0, dtype=torch.int64)
    zero_p = (p[judge_rows, :] == 0).float()
    odd = (torch.rand(total, generator=gen) < 0.15) & (zero_p.sum(-1) > 0)
    if odd.any():  # draft a token the target (and, where q == p, the draft) gives probability 0
        drafts[odd] = torch.multinomial(zero_p[odd], 1, generator=gen).squeeze(1)
    accept_u = torch.rand(total, generator=gen, dtype=torch.float64)
    sample_u = torch.rand(batch, generator=gen, dtype=torch.float64)
    sample_u[torch.rand(batch, generator=gen) < 0.2] = 1 - 2**-53
    sample_u[torch.rand(batch, generator=gen) < 0.1] = 0.0
    argmax = p.argmax(-1)
    greedy_drafts = torch.where(torch.rand(total, generator=gen) < 0.7, argmax[judge_rows], drafts)
    return dict(indptr=indptr, p=p.to(dtype), q=q.to(dtype), drafts=drafts, accept_u=accept_u,
                sample_u=sample_u, argmax=argmax, greedy_drafts=greedy_drafts)


def assert_same(a, b, what: str):
    for name, x, y in zip(("num_accepted", "emitted", "num_emitted"), a, b):
        assert x.dtype == y.dtype == torch.int64, f"{what}: {name} dtype"
        assert torch.equal(x.cpu(), y.cpu()), f"{what}: {name}\n{x}\n{y}"


def dyadic_boundary_case():
    """Exact-arithmetic edges: dyadic probabilities put integer prefix sums exactly on the sampling
    threshold (u = 0.25, 0.5, ...) and on block boundaries (block 8), and u = 1 - 2**-53 makes
    u * total round up to total (needs the clamp to total - 1).  All requests have k = 0 so the
    token is drawn straight from p."""
    vocab, rows = 32, []
    for tokens in ([3, 10, 16, 31], [0, 8, 9, 24], [7, 8, 15, 16]):
        row = torch.zeros(vocab)
        row[tokens] = 0.25
        rows.append(row)
    uniforms = [0.0, 0.25, 0.5, 0.75, 1 - 2**-53]
    p = torch.stack([row for row in rows for _ in uniforms])
    batch = p.shape[0]
    return dict(indptr=torch.zeros(batch + 1, dtype=torch.int64), p=p, q=torch.zeros(0, vocab),
                drafts=torch.zeros(0, dtype=torch.int64), accept_u=torch.zeros(0, dtype=torch.float64),
                sample_u=torch.tensor(uniforms * len(rows), dtype=torch.float64), argmax=p.argmax(-1),
                greedy_drafts=torch.zeros(0, dtype=torch.int64))


def cases_from(specs):
    """(description, block size or None, case dict) for (seed, batch, vocab, max_k, block, dtype)."""
    yield "dyadic boundaries", 8, dyadic_boundary_case()
    for seed, batch, vocab, max_k, block, dtype in specs:
        case = random_ragged_case(torch.Generator().manual_seed(seed), batch, vocab, max_k, dtype)
        yield f"seed={seed} B={batch} V={vocab} max_k={max_k} block={block} {dtype}", block, case


def compare_on(device: str, specs) -> int:
    """Run reference and Triton on every case; returns how many cases were checked."""
    checked = 0
    default_block = tri._MAX_BLOCK_V
    try:
        for what, block, case in cases_from(specs):
            tri._MAX_BLOCK_V = block or default_block  # small blocks -> multi-block scans on small V
            c = {k: v.to(device) for k, v in case.items()}
            assert_same(ref.greedy_accept(c["greedy_drafts"], c["indptr"], c["argmax"]),
                        tri.greedy_accept(c["greedy_drafts"], c["indptr"], c["argmax"]), "greedy " + what)
            args = (c["drafts"], c["indptr"], c["q"], c["p"], c["accept_u"], c["sample_u"])
            assert_same(ref.rejection_sample(*args), tri.rejection_sample(*args), "rejection " + what)
            checked += 1
    finally:
        tri._MAX_BLOCK_V = default_block
    return checked


INTERPRETER_CASES = (  # (seed, batch, vocab, max_k, block or None for the default, dtype)
    [(s, 1 + s % 6, [1, 5, 33, 100][s % 4], 4, [None, 16][s % 2], torch.float32) for s in range(16)]
    + [(100, 4, 37, 3, 8, torch.float16), (101, 3, 64, 5, 64, torch.bfloat16),
       (102, 5, 10_000, 3, None, torch.float32),   # several default-size (4096) blocks
       (103, 2, 151_936, 2, None, torch.float32)]  # the real Qwen vocabulary
)


def test_dyadic_boundary_case_reference_values():
    c = dyadic_boundary_case()
    _, emitted, _ = ref.rejection_sample(c["drafts"], c["indptr"], c["q"], c["p"], c["accept_u"], c["sample_u"])
    assert emitted.view(3, 5).tolist() == [[3, 10, 16, 31, 31], [0, 8, 9, 24, 24], [7, 8, 15, 16, 16]]


def test_triton_matches_reference_under_interpreter():
    if not tri.available():
        pytest.skip("triton is not installed")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=repo_root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"checked {len(INTERPRETER_CASES) + 1} cases" in proc.stdout


def test_kernels_compile_for_gpu_without_float_contraction():
    """Ahead-of-time compile for sm_90 (no GPU needed): catches what the interpreter cannot (typing
    of loop-carried values, lowering), and checks the PTX keeps the float ops the reference does:
    no fused multiply-add and no flush-to-zero, either of which could change bits."""
    if not tri.available():
        pytest.skip("triton is not installed")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from faser_sgl.kernels import _accept_reject_triton_kernels as kernels

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend")
    ptr64, i32 = "*i64", "i32"
    greedy_sig = dict(draft_tokens_ptr=ptr64, draft_indptr_ptr=ptr64, target_argmax_ptr=ptr64,
                      num_accepted_ptr=ptr64, emitted_ptr=ptr64, emitted_stride=i32, emitted_cols=i32)
    sample_sig = dict(draft_tokens_ptr=ptr64, draft_indptr_ptr=ptr64, draft_probs_ptr="*fp32",
                      target_probs_ptr="*fp32", accept_uniforms_ptr="*fp64", sample_uniforms_ptr="*fp64",
                      num_accepted_ptr=ptr64, emitted_ptr=ptr64, emitted_stride=i32, emitted_cols=i32,
                      draft_probs_stride=i32,
                      target_probs_stride=i32, vocab=i32, SCALE="constexpr", BLOCK_V="constexpr")
    target = GPUTarget("cuda", 90, 32)
    triton.compile(ASTSource(kernels.greedy_accept_kernel, greedy_sig), target=target)
    compiled = triton.compile(ASTSource(kernels.rejection_sample_kernel, sample_sig,
                                        constexprs=dict(SCALE=ref.FIXED_POINT_SCALE, BLOCK_V=4096)),
                              target=target)
    ptx = compiled.asm["ptx"]
    assert "fma.rn.f" not in ptx and ".ftz" not in ptx


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_reference_on_cuda():
    cases = INTERPRETER_CASES + [(200 + s, 64, 151_936, 7, None, torch.float32) for s in range(3)]
    assert compare_on("cuda", cases) == len(cases) + 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dispatcher_uses_triton_on_cuda(monkeypatch):
    from faser_sgl import kernels

    calls = []
    real = tri.rejection_sample
    monkeypatch.setattr(tri, "rejection_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = {k: v.cuda() for k, v in random_ragged_case(torch.Generator().manual_seed(5), 4, 50, 3).items()}
    kernels.rejection_sample(c["drafts"], c["indptr"], c["q"], c["p"], c["accept_u"], c["sample_u"])
    assert calls == [1]


if __name__ == "__main__":  # the interpreter subprocess of test_triton_matches_reference_under_interpreter
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(f"checked {compare_on('cpu', INTERPRETER_CASES)} cases")
