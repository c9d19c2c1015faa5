#!/usr/bin/env bash
# Build wheelhouse/: what the borrowed GPU machine lacks, carried to it with the working tree.
#
#   bash scripts/build_wheelhouse.sh [--budget-mib N]      (or: make wheelhouse)
#
# The device image has Python 3.12, torch 2.11 (cu130), triton 3.6, numpy, nvcc and torch's own
# dependencies, and no network.  At most 64 MiB travel per call (working tree + carried paths),
# so this downloads, for CPython 3.12 on manylinux x86_64, with --no-deps:
#   - flashinfer-python (requirements/cuda.txt's pin), SLIMMED: its wheel is ~59 MiB, almost all
#     of it data/csrc/<subdir>/ kernel sources of features the executor never builds (MoE, GDN,
#     KDA, Blackwell, ...).  The executor JIT-compiles only the batch-prefill kernels, whose
#     sources are csrc/*.cu|*.jinja at the top level plus data/include, cutlass, cccl and spdlog;
#     all of those are kept, as is every Python file (flashinfer imports most of them at start).
#   - flashinfer's import/JIT needs: apache-tvm-ffi, ninja, click, einops, tabulate,
#     nvidia-ml-py, packaging, requests (+ urllib3, idna, certifi, charset-normalizer), tqdm,
#     cuda-bindings/cuda-pathfinder (green contexts; torch's own dep on most images,
#     installed only where missing).  Its heavy optional deps (nvidia-cutlass-dsl, cuda-tile,
#     nccl4py, nccl-extensions, nvidia-cudnn-frontend) are left out: the executor's paths never
#     import them.
#   - the executor's and the CUDA tests' pure-Python needs: safetensors, psutil, pytest (+
#     pluggy, iniconfig, pygments), pytest-timeout.
#   - tiny_models/: the tiny checkpoints the CUDA tests use, pre-built here (tests/tiny_model.py
#     needs transformers + tokenizers to build them, which do not fit); on the device
#     FASER_SGL_TEST_CACHE points there.  They are keyed by tests/tiny_model.py's source, so
#     rebuild the wheelhouse after editing that file.
# Then it prints the size and fails when wheelhouse + the working tree that travels exceed the
# budget (default 60 MiB, under the 64 MiB limit).  gpu_check.sh installs only the wheels whose
# distribution the image lacks (scripts/gpu_check.sh, docs/gpu_check.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_MIB=60
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-mib) BUDGET_MIB=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PY:-.venv/bin/python}
WH=wheelhouse
FLASHINFER_PIN=$(grep -E '^flashinfer-python==' requirements/cuda.txt)

# Exact pins (the lock file's versions where it has the package).
PACKAGES=(
  "$FLASHINFER_PIN"
  apache-tvm-ffi==0.1.11
  ninja==1.13.0
  click==8.5.1
  einops==0.8.2
  tabulate==0.10.0
  nvidia-ml-py==13.580.82
  packaging==26.3
  requests==2.34.2
  urllib3==2.8.0
  idna==3.20
  certifi==2026.10.19.post1
  charset-normalizer==3.5.2
  tqdm==4.70.1
  cuda-bindings==13.5.0
  cuda-pathfinder==1.9.0
  safetensors==0.8.0
  psutil==7.2.2
  pytest==9.2.0
  pluggy==1.7.0
  iniconfig==2.3.1
  Pygments==2.21.0
  pytest-timeout==2.4.0
)

rm -rf "$WH.tmp"
mkdir -p "$WH.tmp"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_27_x86_64 --platform any \
  -d "$WH.tmp" "${PACKAGES[@]}"

# Slim flashinfer: drop data/csrc/<subdir>/ (kept: nv_internal and generated, which top-level
# sources include) and rewrite RECORD without the dropped files.
"$PY" - "$WH.tmp" <<'EOF'
import sys, zipfile
from pathlib import Path
wh = Path(sys.argv[1])
KEEP_SUBDIRS = {"nv_internal", "generated"}
for whl in wh.glob("flashinfer_python-*.whl"):
    out = whl.with_suffix(".slim")
    dropped = kept = 0
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        names = set()
        for info in src.infolist():
            parts = info.filename.split("/")
            if (parts[:3] == ["flashinfer", "data", "csrc"] and len(parts) > 4
                    and parts[3] not in KEEP_SUBDIRS):
                dropped += 1
                continue
            names.add(info.filename)
        for info in src.infolist():
            if info.filename not in names:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [l for l in data.decode().splitlines() if l.split(",", 1)[0] in names
                         or l.split(",", 1)[0].endswith("RECORD")]
                data = ("\n".join(lines) + "\n").encode()
            kept += 1
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    before, after = whl.stat().st_size, out.stat().st_size
    out.replace(whl)
    print(f"[wheelhouse] slimmed {whl.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB "
          f"({dropped} csrc files of unused features dropped, {kept} kept)")
    (wh / "SLIMMED.txt").write_text(
        f"{whl.name} was repacked by scripts/build_wheelhouse.sh: data/csrc/<subdir>/ removed "
        f"except {sorted(KEEP_SUBDIRS)} ({dropped} files); everything else is the PyPI wheel's.\n")
EOF

# The tiny checkpoints the CUDA tests build through tests/tiny_model.py (needs transformers).
FASER_SGL_TEST_CACHE="$PWD/$WH.tmp/tiny_models" HF_HUB_OFFLINE=1 "$PY" - <<'EOF'
import sys
sys.path.insert(0, "tests")
from tiny_model import HEAD_DIM64_DRAFT, HEAD_DIM64_TARGET, get_tiny_model
from conftest import PARTIAL_DRAFT
paths = [get_tiny_model("llama", seed=0), get_tiny_model(**PARTIAL_DRAFT), get_tiny_model("qwen3"),
         # head_dim 64, for FlashInfer (its FA2 prefill refuses head_dim 16)
         get_tiny_model(**HEAD_DIM64_TARGET), get_tiny_model(**HEAD_DIM64_DRAFT),
         get_tiny_model("qwen3", hidden_size=256, init_std=0.075)]
print("[wheelhouse] tiny test models:", *(p.rsplit("/", 1)[-1] for p in paths))
EOF

printf '%s\n' "${PACKAGES[@]}" > "$WH.tmp/PACKAGES.txt"
rm -rf "$WH"
mv "$WH.tmp" "$WH"
ls -la "$WH"
"$PY" -m faser_sgl.sim.gpu_profile --check-carry "$WH" --budget-mib "$BUDGET_MIB"
