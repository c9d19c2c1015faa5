"""scripts/gpu_check.sh and faser_sgl.sim.gpu_profile: the CPU dry run runs every step but the
CUDA ones (the shipped combination rehearsed on the CPU) and writes one results file, a cost
profile the simulator loads; the install puts the wheelhouse's ninja on PATH; the carry budget
check; and, on CUDA, the real profiler on a small shape and early exit on the GPU (these two are
run by gpu_check.sh on the device)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from faser_sgl.sim.cost_profile import load_cost_profile
from faser_sgl.sim.gpu_profile import PLANS, Profiler, check_carry, curve_points

ROOT = Path(__file__).resolve().parent.parent


def assert_curve_ok(points):
    assert points, "empty curve"
    tokens = [n for n, _ in points]
    secs = [s for _, s in points]
    assert tokens == sorted(set(tokens)) and all(s > 0 for s in secs)
    assert all(b >= a for a, b in zip(secs, secs[1:])), points


def test_dry_run_writes_a_cost_profile_the_simulator_loads(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TOTAL_S": "240"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "out" / "gpu_check.json"
    data = json.loads(results.read_text())

    check = data["gpu_check"]
    steps = check["steps"]
    assert list(steps) == ["environment", "install", "toolchain", "jit", "cuda_tests", "combination", "profile"]
    assert all(s["rc"] == 0 for s in steps.values()), steps
    for skipped in ("install", "jit", "cuda_tests"):  # no wheelhouse given; CUDA only
        assert steps[skipped]["note"].startswith("skipped"), skipped
    assert check["environment"]["cuda_available"] is False
    assert check["toolchain"]["ninja"]  # the JIT's ninja resolves by name
    # The shipped combination, rehearsed on the CPU: lossless, bf16 stand-in, server smoke.
    assert check["combination"]["tests"] == 3 and check["combination"]["skipped"] == 0, check["combination"]
    assert check["combination"]["failed"] == [] and check["ok"] is True
    assert check["run"]["flashinfer_backend"] == "fa2" and check["total_s"] < 240
    assert (tmp_path / "out" / "profile.log").is_file()
    assert sorted(p.suffix for p in (tmp_path / "out").glob("*.json")) == [".json"]  # one results file

    prof = data["gpu_profile"]
    assert prof["status"] == "complete", (prof["errors"], prof["skipped"])
    plan = PLANS["dry-run"]
    assert len(prof["verify_grid"]) == len(plan["batches"]) * len(plan["tokens"])
    assert len(prof["draft_grid"]) == len(plan["batches"]) * len(plan["draft_tokens"])
    exits = prof["early_exit"]["results"][0]["exits"]
    assert [e["layer"] for e in exits] == [1, 2, 3] and all(e["prefix_ms"] > 0 for e in exits)
    split = prof["overlap"]["results"][0]["splits"][0]
    assert split["name"] == "cpu:shared" and split["concurrent_ms"] > 0
    assert split["verify_busy_ms"] > 0 and split["draft_busy_ms"] > 0  # each side beside the other
    assert prof["context_sweep"]

    profile = load_cost_profile(str(results))
    assert profile.name == "dry-run-cpu-tiny"
    for curve in (profile.target, profile.draft):
        assert_curve_ok(curve.points)
    assert profile.seconds("target", 1) <= profile.seconds("target", 16) <= profile.seconds("target", 1000)
    # The split measured in the overlap stage, for the simulator's frontier pipeline.
    assert [(s.name, s.draft_share) for s in profile.splits] == [("cpu:shared", 0)]
    assert profile.splits[0].seconds("target", 4) > 0


def fake_ninja_wheel(dest: Path) -> Path:
    """A wheel shaped like PyPI's ninja: the binary in ninja/data/bin (here a script)."""
    whl = dest / "ninja-1.13.0-py3-none-manylinux_2_17_x86_64.whl"
    files = {"ninja/__init__.py": "", "ninja/data/bin/ninja": "#!/bin/sh\necho 1.13.0-fake\n",
             "ninja-1.13.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: ninja\nVersion: 1.13.0\n",
             "ninja-1.13.0.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}
    files["ninja-1.13.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + \
        "ninja-1.13.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name.endswith("bin/ninja") else 0o644) << 16
            z.writestr(info, text)
    return whl


def test_the_wheelhouse_ninja_is_on_path_after_install(tmp_path):
    """FlashInfer's JIT runs `ninja` by name; the carried ninja lands in the install target
    ($SITE/bin or $SITE/ninja/data/bin), which the check puts on PATH."""
    wheelhouse = tmp_path / "wh"
    wheelhouse.mkdir()
    fake_ninja_wheel(wheelhouse)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WHEELHOUSE": str(wheelhouse),
           "STEPS": "install toolchain", "TOTAL_S": "120"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = data["gpu_check"]["steps"]
    install_log = (tmp_path / "out" / "install.log").read_text()
    assert steps["install"]["rc"] == 0 and "ninja-1.13.0" in install_log, install_log
    toolchain = data["gpu_check"]["toolchain"]
    assert toolchain["ninja_from_site"], toolchain
    assert "1.13.0-fake" in (tmp_path / "out" / "toolchain.log").read_text()


def test_curve_points_average_equal_token_counts_and_never_decrease():
    cells = [{"tokens": 4, "ms": 10.0}, {"tokens": 4, "ms": 12.0}, {"tokens": 1, "ms": 9.0},
             {"tokens": 8, "ms": 10.5}, {"tokens": 16, "ms": None}]
    assert curve_points(cells) == [[1, 9.0], [4, 11.0], [8, 11.0]]


def test_carry_budget(tmp_path):
    (tmp_path / "wh").mkdir()
    (tmp_path / "wh" / "a.whl").write_bytes(b"x" * (3 * 2**20))
    (tmp_path / "wh" / "sub").mkdir()
    (tmp_path / "wh" / "sub" / "b").write_bytes(b"y" * 2**20)
    ok = check_carry(["wh"], 10, root=tmp_path, tree_bytes=5 * 2**20)
    assert ok["ok"] and ok["paths"] == {"wh": 4.0} and ok["total_mib"] == 9.0
    over = check_carry(["wh"], 8.5, root=tmp_path, tree_bytes=5 * 2**20)
    assert not over["ok"]


def image_packages() -> set[str]:
    return {line.strip() for line in (ROOT / "scripts" / "device_image_packages.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def wheel_dists(wheelhouse: Path) -> set[str]:
    return {re.sub(r"[-_.]+", "-", p.name.split("-")[0].lower()) for p in wheelhouse.glob("*.whl")}


@pytest.mark.skipif(not (ROOT / "wheelhouse").is_dir(), reason="no wheelhouse/ (make wheelhouse)")
def test_built_wheelhouse_fits_the_carry_budget():
    """Call 2's carry: FlashInfer, slimmed, and only what the device image lacks."""
    r = check_carry(["wheelhouse"], 60, root=ROOT)
    assert r["ok"], r
    assert "flashinfer-python" in wheel_dists(ROOT / "wheelhouse")
    assert not wheel_dists(ROOT / "wheelhouse") & image_packages()
    assert (ROOT / "wheelhouse" / "tiny_models").is_dir()


@pytest.mark.skipif(not (ROOT / "wheelhouse_server").is_dir(), reason="no wheelhouse_server/ (make wheelhouse)")
def test_built_server_wheelhouse_fits_the_carry_budget():
    """Call 1's carry: SGLang's front half, slimmed (no Rust extensions), and its dependencies
    the image lacks; with tvm_ffi too, so that call 1 imports the server on its own."""
    r = check_carry(["wheelhouse_server"], 60, root=ROOT)
    assert r["ok"], r
    dists = wheel_dists(ROOT / "wheelhouse_server")
    assert {"sglang", "fastapi", "uvicorn", "pyzmq", "pydantic", "apache-tvm-ffi"} <= dists
    assert not dists & image_packages()
    sglang = next((ROOT / "wheelhouse_server").glob("sglang-*.whl"))
    with zipfile.ZipFile(sglang) as z:
        assert not [n for n in z.namelist() if n.endswith(".so") or n.startswith("sglang/multimodal_gen/")]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_profiler_on_cuda_small_shape(tmp_path):
    plan = dict(PLANS["gpu"], target="qwen3-0.6b", draft="qwen3-0.6b", batches=(1, 8), tokens=(1, 4),
                draft_tokens=(1,), exit_shapes=((8, 4),), overlap_shapes=((8, 4),),
                context_sweep=(2, 4, (512, 1024)), warmup=1, reps=2)
    out = tmp_path / "p.json"
    prof = Profiler(str(out), dry_run=False, budget_s=240, plan=plan).run()
    assert prof["status"] == "complete", (prof["errors"], prof["skipped"])
    profile = load_cost_profile(str(out))
    assert_curve_ok(profile.target.points) and len(profile.target.points) == 3  # 1, 4, 8 = 8x1, 32
    assert prof["overlap"]["results"][0]["splits"][0]["name"] == "cuda:streams"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_early_exit_keeps_greedy_output_on_cuda(tiny_model_path, partial_draft_path):
    """Early exit's segmented verification (prune every scored draft at layer 1, and the lens
    rule) on the GPU: greedy output stays the target's."""
    from spec_harness import Engine

    prompts = [[5, 17, 33], list(range(40, 75)), [7] * 11, [3, 9]]
    reference = Engine(tiny_model_path, None, device="cuda")
    expected = reference.run([reference.make_request(p, 16, temperature=0) for p in prompts])
    for options in ({"layers": "1", "threshold": float("-inf"), "draft_prob": float("inf")},
                    {"layers": "2", "threshold": 1.0}):
        engine = Engine(tiny_model_path, partial_draft_path, k=4, device="cuda", early_exit=True,
                        exit_options=options)
        outs = engine.run([engine.make_request(p, 16, temperature=0) for p in prompts])
        assert outs == expected, options
        assert engine.generator.early_exit.stats.as_dict()["rows_pruned"] > 0
