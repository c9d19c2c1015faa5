#!/usr/bin/env bash
# Build what the borrowed GPU machine lacks, carried to it with the working tree (docs/gpu_check.md):
#
#   bash scripts/build_wheelhouse.sh [--budget-mib N]      (or: make wheelhouse)
#
# At most 64 MiB travel per call (working tree + carried paths), and FlashInfer plus SGLang's
# front half do not fit one call beside the tree, so this builds two parts, each checked against
# the budget (default 60 MiB) with the tree:
#   wheelhouse/         (call 2, the check itself) FlashInfer and its import/JIT needs, the
#                       executor's and the CUDA tests' needs, and tiny_models/
#   wheelhouse_server/  (call 1, installed into wheelhouse_server/site, which stays on the warm
#                       machine) SGLang's front half, slimmed, and its dependencies: what
#                       `python -m faser_sgl.launch_server` imports, for the HTTP smoke test
# Which packages: the lists below name everything each part needs; a package is downloaded only
# when scripts/device_image_packages.txt (the device image's packages, from the device tool's
# KINDS.md) does NOT list it.  gpu_check.sh's install step still installs only wheels whose
# distribution the device's Python lacks (a safety net where the image differs from the list).
# Wheels are CPython $PYVER (3.12, the device's; PYVER=3.11 builds the same recipe for this
# machine's Python, for a rehearsal) manylinux x86_64, --no-deps, exact pins (the lock file's).
#   - flashinfer-python SLIMMED (scripts/slim_wheel.py): its wheel is ~59 MiB, almost all of it
#     data/csrc/<subdir>/ kernel sources of features the executor never builds (MoE, GDN, KDA,
#     Blackwell, ...).  The executor JIT-compiles only the batch-prefill kernels (csrc/*.cu|*.jinja
#     at the top level, nv_internal/ and generated/, plus data/include, cutlass, cccl, spdlog); all
#     of those and every Python file are kept.  Its heavy optional deps (nvidia-cutlass-dsl,
#     cuda-tile, nccl4py, nccl-extensions, nvidia-cudnn-frontend) are left out: the executor's
#     paths never import them.
#   - sglang SLIMMED: ~37 MiB, of which the Rust extensions (*.so, 18 MiB), multimodal_gen/,
#     test/ and benchmark/ are never imported by the HTTP server (import trace of the server's
#     processes on a CPU, docs/gpu_check.md), so they are dropped.
#   - tiny_models/: the CUDA tests' tiny checkpoints, pre-built here (tests/tiny_model.py), keyed by
#     its source: rebuild after editing that file.  On the device FASER_SGL_TEST_CACHE points there.
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
PYVER=${PYVER:-3.12}
CP=cp${PYVER/./}
PARTS=${PARTS:-check server}
WH_CHECK=${WH_CHECK:-wheelhouse}
WH_SERVER=${WH_SERVER:-wheelhouse_server}
FLASHINFER_PIN=$(grep -E '^flashinfer-python==' requirements/cuda.txt)

# Everything the check needs (flashinfer's import/JIT needs, the executor's and the tests').
CHECK_NEEDS=(
  "$FLASHINFER_PIN" apache-tvm-ffi==0.1.11 ninja==1.13.0 click==8.5.1 einops==0.8.2
  tabulate==0.10.0 nvidia-ml-py==13.580.82 packaging==26.3 requests==2.34.2 urllib3==2.8.0
  idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.2 tqdm==4.70.1
  cuda-bindings==13.5.0 cuda-pathfinder==1.9.0 safetensors==0.8.0 psutil==7.2.2 pytest==9.2.0
  pluggy==1.7.0 iniconfig==2.3.1 Pygments==2.21.0 pytest-timeout==2.4.0
)
# Everything the HTTP server's processes import beyond the executor: the top-level modules seen
# in sys.modules of `python -m faser_sgl.launch_server` (main, scheduler, detokenizer) serving
# /generate, mapped to their distributions (docs/gpu_check.md).  Image-listed ones are skipped.
SERVER_NEEDS=(
  sglang==0.5.23 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4
  pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 pyzmq==27.3.0
  orjson==3.13.0 msgspec==0.22.0 pybase64==1.5.1 python-multipart==0.0.34 setproctitle==1.3.8
  partial-json-parser==0.2.1.1.post7 openai==2.8.0 openai-harmony==0.0.4 distro==1.9.0
  sniffio==1.3.1 xgrammar==0.2.7 compressed-tensors==0.18.0 gguf==0.19.0
  ipython==9.18.1 traitlets==5.16.1 dill==0.4.1 jsonschema==4.26.0 referencing==0.37.0
  jsonschema-specifications==2025.9.1 rpds-py==2026.9.1 loguru==0.7.3 opentelemetry-api==1.45.2
  soundfile==0.13.1 cffi==2.1.1 watchfiles==1.3.0 zstandard==0.25.0
  # also the check's: sglang.kernels imports it, and call 1 must import the server on its own
  apache-tvm-ffi==0.1.11
  # on the image already (skipped): aiohttp uvloop prometheus-client anyio h11 httpx typing-extensions
  aiohttp uvloop prometheus-client anyio h11 httpx typing-extensions
)

# missing NAME...: the pins whose distribution the device image list does not hold.
missing() {
  "$PY" - "$@" <<'EOF'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n.lower())
have = {norm(l.strip()) for l in open("scripts/device_image_packages.txt") if l.strip() and not l.startswith("#")}
for pin in sys.argv[1:]:
    (print(pin) if norm(re.split(r"[=<>!~ ]", pin)[0]) not in have
     else print(f"[wheelhouse] on the image, skipped: {pin}", file=sys.stderr))
EOF
}

# download DIR PIN...: the CPython $PYVER manylinux x86_64 wheels, no dependencies.
download() {
  local dir=$1; shift
  local plats=(--platform any --platform manylinux2014_x86_64)
  for n in 5 17 24 26 27 28 31 34; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --abi "$CP" --abi abi3 --abi none "${plats[@]}" -d "$dir" "$@" 2>&1 | grep -v "^WARNING: Location" || true
  printf '%s\n' "$@" > "$dir/PACKAGES.txt"
  [ "$(ls "$dir"/*.whl | wc -l)" = "$#" ] || { echo "[wheelhouse] $dir: expected $# wheels" >&2; exit 1; }
}

for part in $PARTS; do
  case "$part" in
    check) WH=$WH_CHECK; mapfile -t PINS < <(missing "${CHECK_NEEDS[@]}") ;;
    server) WH=$WH_SERVER; mapfile -t PINS < <(missing "${SERVER_NEEDS[@]}") ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
  rm -rf "$WH.tmp"; mkdir -p "$WH.tmp"
  download "$WH.tmp" "${PINS[@]}"
  if [ "$part" = check ]; then
    "$PY" scripts/slim_wheel.py "$WH.tmp"/flashinfer_python-*.whl "$WH.tmp/SLIMMED.txt" \
      --drop 'flashinfer/data/csrc/*/*' \
      --keep 'flashinfer/data/csrc/nv_internal/*' --keep 'flashinfer/data/csrc/generated/*'
    # The tiny checkpoints the CUDA tests build through tests/tiny_model.py (needs transformers).
    FASER_SGL_TEST_CACHE="$PWD/$WH.tmp/tiny_models" HF_HUB_OFFLINE=1 "$PY" - <<'EOF'
import sys
sys.path.insert(0, "tests")
from tiny_model import HEAD_DIM64_DRAFT, HEAD_DIM64_TARGET, get_tiny_model
from conftest import PARTIAL_DRAFT
from test_executor_flashinfer import QWEN3_HEAD_DIM64
paths = [get_tiny_model("llama", seed=0), get_tiny_model(**PARTIAL_DRAFT), get_tiny_model("qwen3"),
         # head_dim 64, for FlashInfer (its FA2 prefill refuses head_dim 16)
         get_tiny_model(**HEAD_DIM64_TARGET), get_tiny_model(**HEAD_DIM64_DRAFT),
         get_tiny_model("qwen3", **QWEN3_HEAD_DIM64)]
print("[wheelhouse] tiny test models:", *(p.rsplit("/", 1)[-1] for p in paths))
EOF
  else
    "$PY" scripts/slim_wheel.py "$WH.tmp"/sglang-*.whl "$WH.tmp/SLIMMED.txt" \
      --drop 'sglang/srt/rust_extensions/*' --drop 'sglang/multimodal_gen/*' --drop 'sglang/test/*' \
      --drop 'sglang/benchmark/*' --drop '*.so'
  fi
  rm -rf "$WH"; mv "$WH.tmp" "$WH"
  ls -la "$WH"
done
status=0
for part in $PARTS; do
  case "$part" in check) WH=$WH_CHECK ;; server) WH=$WH_SERVER ;; esac
  "$PY" -m faser_sgl.sim.gpu_profile --check-carry "$WH" --budget-mib "$BUDGET_MIB" || status=1
done
exit $status
