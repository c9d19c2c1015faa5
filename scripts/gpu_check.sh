#!/usr/bin/env bash
# One command for a borrowed GPU machine (docs/gpu_check.md):
#
#   STEPS=install WHEELHOUSE=wheelhouse_server bash scripts/gpu_check.sh
#                                          device call 1: SGLang's front half (carry wheelhouse_server)
#   bash scripts/gpu_check.sh              device call 2, on the still-warm machine (carry wheelhouse)
#   bash scripts/gpu_check.sh --dry-run    on a CPU: every step but the CUDA ones (see below)
#
# Steps, in order (STEPS="..." runs a subset, e.g. a rerun of "cuda_tests combination"):
#   environment  Python, torch, GPU, SMs, nvidia-smi, nvcc
#   install      the wheelhouse's wheels this Python lacks, into $SITE, which is first on
#                PYTHONPATH; $SITE/bin and $SITE/ninja/data/bin are on PATH from the start:
#                FlashInfer's JIT runs `ninja` by name
#   toolchain    which ninja and nvcc the JIT will run (fails without ninja)
#   jit          FlashInfer's prefill modules for bf16 head_dim 64 (tiny test models) and 128
#                (the profile), built in parallel, their cold-compile seconds recorded; FA2 is
#                pinned (FASER_SGL_FLASHINFER_BACKEND, fa2 unless set): on sm90 FlashInfer's
#                "auto" picks FA3, whose cold build may not fit a borrowed machine's minutes
#   cuda_tests   FlashInfer vs torch attention, Triton kernels, the speculative step, CUDA
#                streams / green contexts (asserting which split engaged), early exit, profiler
#   combination  the shipped combination end to end: faser policy + frontier pipeline + early
#                exit (FlashInfer re-planned after each truncation): lossless vs target-only
#                greedy in float32, FlashInfer bf16 in-process, a bf16 FlashInfer server over HTTP
#   profile      the GPU cost profile for the simulator, in whatever time is left
# The dry run installs from $WHEELHOUSE only when that is set (into $OUT/site), skips jit and
# cuda_tests, runs the combination on the CPU (FASER_GPU_CHECK_REHEARSAL=1: torch attention in
# float32 standing in for FlashInfer) and the profiler on tiny shapes.
#
# Writes ONE results file, $OUT/gpu_check.json (OUT defaults to ./gpu_check_out): a cost profile
# the simulator loads (--cost-profile $OUT/gpu_check.json) with the measurements under
# "gpu_profile" and this script's steps under "gpu_check"; the raw logs lie beside it.  It is
# rewritten after every step and every measurement, so a run cut short leaves what was done.
# Every step has its own timeout; the whole run stays under TOTAL_S (default 390 s, so that a
# device start plus this run plus a rerun fit 15 minutes of device time: docs/gpu_check.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/gpu_check.json"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ "$DRY_RUN" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
  else PY=$(command -v python3 || command -v python); fi
fi
TOTAL_S=${TOTAL_S:-390}
STEPS=${STEPS:-environment install toolchain jit cuda_tests combination profile}
START=$(date +%s)
if [ "$DRY_RUN" = 1 ]; then
  WHEELHOUSE=${WHEELHOUSE:-}
  SITE="$OUT/site"              # a rehearsal never writes into the real wheelhouse
else
  WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
  SITE="$(cd "$(dirname "$WHEELHOUSE")" && pwd)/$(basename "$WHEELHOUSE")/site"  # pip --target; ignored
fi
# SGLang's front half for the HTTP smoke test does not fit one call beside FlashInfer: call 1
# installs wheelhouse_server/ into its own site, which stays on the warm machine for call 2
# (docs/gpu_check.md: two calls).  It is on the path whichever wheelhouse this run installs.
SERVER_SITE=${SERVER_SITE:-$PWD/wheelhouse_server/site}
export PYTHONPATH="$SITE:$SERVER_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$SITE/ninja/data/bin:$PATH"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DRY_RUN SITE SERVER_SITE
export FASER_SGL_FLASHINFER_BACKEND=${FASER_SGL_FLASHINFER_BACKEND:-fa2}
if [ -n "${MAX_JOBS:-}" ]; then export MAX_JOBS; fi   # ninja -j for the JIT (default: cores + 2)
if [ -n "$WHEELHOUSE" ] && [ -d "$WHEELHOUSE/tiny_models" ]; then
  FASER_SGL_TEST_CACHE="$(cd "$WHEELHOUSE/tiny_models" && pwd)"
  export FASER_SGL_TEST_CACHE
fi
rm -f "$RESULTS"

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
wanted() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# merge NAME JSON: set "gpu_check"[NAME] in the results file.
merge() {
  "$PY" -c '
import json, os, sys
path, name, value = sys.argv[1:]
data = json.load(open(path)) if os.path.exists(path) else {}
data.setdefault("gpu_check", {})[name] = json.loads(value)
json.dump(data, open(path + ".tmp", "w"), indent=1); os.replace(path + ".tmp", path)
' "$RESULTS" "$1" "$2" || echo "[gpu_check] could not record $1" >&2
}

# record_step NAME RC SECONDS LOG [NOTE]: merge one step into "gpu_check"."steps".
record_step() {
  "$PY" -c '
import json, os, sys, time
path, name, rc, secs, log = sys.argv[1:6]
note = sys.argv[6] if len(sys.argv) > 6 else ""
data = json.load(open(path)) if os.path.exists(path) else {}
chk = data.setdefault("gpu_check", {})
chk.setdefault("steps", {})[name] = {"rc": int(rc), "seconds": int(secs), "log": os.path.basename(log),
                                     **({"note": note} if note else {})}
chk["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
json.dump(data, open(path + ".tmp", "w"), indent=1); os.replace(path + ".tmp", path)
' "$RESULTS" "$@" || echo "[gpu_check] could not record step $1" >&2
}

# skip NAME NOTE: record a step that does not run here.
skip() { record_step "$1" 0 0 "$OUT/$1.log" "skipped: $2"; }

# step NAME TIMEOUT_S CMD...: run with its own timeout, log to $OUT/NAME.log, record rc and time.
step() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" t0 rc
  if ! wanted "$name"; then
    return 0
  fi
  local budget; budget=$(left)
  [ "$limit" -gt "$budget" ] && limit=$budget
  if [ "$limit" -lt 5 ]; then
    record_step "$name" 125 0 "$log" "skipped: the run's ${TOTAL_S} s are spent"
    return 0
  fi
  echo "[gpu_check] $name (timeout ${limit}s)"
  t0=$(date +%s)
  set +e
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  set -e
  local note=""
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="timed out after ${limit} s"; fi
  record_step "$name" "$rc" "$(( $(date +%s) - t0 ))" "$log" "$note"
  tail -n 3 "$log" | sed "s/^/[gpu_check]   /"
  return 0
}

# junit_summary NAME XML: the pytest counts and failures of a step into "gpu_check"[NAME].
junit_summary() {
  "$PY" - "$RESULTS" "$1" "$2" <<'EOF' || true
import json, os, sys, xml.etree.ElementTree as ET
path, name, xml = sys.argv[1:]
try:
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    summary = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    summary["properties"] = {p.get("name"): p.get("value") for p in suite.iter("property")}
except (OSError, ET.ParseError, AttributeError) as err:
    summary = {"unparsed": repr(err)}
data = json.load(open(path)) if os.path.exists(path) else {}
data.setdefault("gpu_check", {})[name] = summary
json.dump(data, open(path + ".tmp", "w"), indent=1); os.replace(path + ".tmp", path)
EOF
}

merge run "{\"dry_run\": $([ "$DRY_RUN" = 1 ] && echo true || echo false), \"steps_asked\": \"$STEPS\", \"total_s_limit\": $TOTAL_S, \"flashinfer_backend\": \"$FASER_SGL_FLASHINFER_BACKEND\"}"

# 1. Environment: torch / CUDA / GPU.
step environment 30 "$PY" - <<'EOF'
import json, platform, shutil, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "nvcc": shutil.which("nvcc"), "cpus": len(__import__("os").sched_getaffinity(0))}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as err:
    info["triton"] = f"missing: {err}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                capability=f"{p.major}.{p.minor}")
for cmd in (["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"],
            ["nvcc", "--version"]):
    try:
        info[cmd[0]] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info[cmd[0]] = f"unavailable: {err}"
print(json.dumps(info, indent=1))
EOF
if wanted environment; then
  merge environment "$(cat "$OUT/environment.log" 2>/dev/null | "$PY" -c 'import json,sys
try: print(json.dumps(json.load(sys.stdin)))
except ValueError: print("{\"unparsed\": true}")')"
fi

# 2. Install the wheelhouse offline: only the distributions this Python lacks, into $SITE.
if wanted install && [ -z "$WHEELHOUSE" ]; then
  skip install "dry run without WHEELHOUSE (the CPU venv has everything)"
elif wanted install && [ ! -d "$WHEELHOUSE" ]; then
  record_step install 1 0 "$OUT/install.log" "no $WHEELHOUSE/: build it with make wheelhouse and carry it"
else
  step install 60 bash -c '
    set -e
    missing=$("$0" - "$2" <<EOF
import importlib.metadata as md, pathlib, sys
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0]
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        try:
            md.version(dist.replace("_", "-"))
        except md.PackageNotFoundError:
            print(whl)
EOF
)
    echo "to install: ${missing:-nothing}"
    if [ -n "$missing" ] && "$0" -m pip --version >/dev/null 2>&1; then
      "$0" -m pip install --no-index --no-deps --disable-pip-version-check --target "$1" $missing
    elif [ -n "$missing" ]; then  # no pip in the image: a wheel is a zip of the installed tree
      "$0" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$1" $missing
    fi
    chmod +x "$1"/ninja/data/bin/* "$1"/bin/* 2>/dev/null || true
    # What this wheelhouse is for must import from here (a dry run checks only its server part,
    # whose wheels a rehearsal builds for the local Python).
    if ls "$2"/flashinfer_python-*.whl >/dev/null 2>&1 && [ "$DRY_RUN" != 1 ]; then
      "$0" -c "import flashinfer, tvm_ffi, safetensors, pytest; print(\"flashinfer\", flashinfer.__version__)"
    fi
    if ls "$2"/sglang-*.whl >/dev/null 2>&1; then
      "$0" -c "import sglang.srt.entrypoints.http_server, fastapi, uvicorn, zmq; print(\"sglang front half from\", sglang.__file__)"
    fi
  ' "$PY" "$SITE" "$WHEELHOUSE"
fi

# 3. The JIT's tools: FlashInfer runs `ninja` by name and nvcc through it.
step toolchain 20 bash -c '
  ninja_path=$(command -v ninja || true)
  nvcc_path=$(command -v nvcc || true)
  echo "ninja: ${ninja_path:-missing} $( [ -n "$ninja_path" ] && ninja --version 2>&1)"
  echo "nvcc: ${nvcc_path:-missing}"
  case "$ninja_path" in "$SITE"/*) echo "ninja from the wheelhouse" ;; esac
  [ -n "$ninja_path" ] || { echo "no ninja on PATH: FlashInfer cannot JIT-compile"; exit 1; }
  [ "$DRY_RUN" = 1 ] || [ -n "$nvcc_path" ] || { echo "no nvcc on PATH"; exit 1; }
'
if wanted toolchain; then
  merge toolchain "$("$PY" -c 'import json, shutil, os
n = shutil.which("ninja")
print(json.dumps({"ninja": n, "ninja_from_site": bool(n and n.startswith(os.environ["SITE"] + "/")),
                  "nvcc": shutil.which("nvcc")}))')"
fi

# 4. FlashInfer's JIT: the prefill modules every later step loads, built in parallel, timed cold.
if [ "$DRY_RUN" = 1 ]; then
  wanted jit && skip jit "dry run on a CPU (FlashInfer JIT needs CUDA)"
else
  step jit 180 "$PY" scripts/flashinfer_jit_warmup.py 64 128 --dtype bfloat16
  if wanted jit; then
    merge jit "$("$PY" -c 'import json, sys
rows = []
for line in open(sys.argv[1], errors="replace"):
    try:
        rows.append(json.loads(line))
    except ValueError:
        pass
print(json.dumps({"modules": [r for r in rows if isinstance(r, dict) and "head_dim" in r]}))' "$OUT/jit.log")"
  fi
fi

# 5. The CUDA tests (FlashInfer cases in bf16 only: each dtype x head_dim is a JIT module).
CUDA_TESTS=(
  tests/test_executor_flashinfer.py
  tests/test_kernels_triton_equivalence.py::test_triton_matches_reference_on_cuda
  tests/test_kernels_triton_equivalence.py::test_dispatcher_uses_triton_on_cuda
  tests/test_speculative_cuda.py::test_speculative_step_on_cuda
  tests/test_frontier_pipeline.py::test_cuda_streams_and_green_contexts_keep_greedy_output
  tests/test_gpu_check.py::test_profiler_on_cuda_small_shape
  tests/test_gpu_check.py::test_early_exit_keeps_greedy_output_on_cuda
)
if [ "$DRY_RUN" = 1 ]; then
  wanted cuda_tests && skip cuda_tests "dry run on a CPU (no CUDA device)"
else
  step cuda_tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider -o timeout=140 -k "not fp16" \
    --junitxml="$OUT/cuda_tests.xml" "${CUDA_TESTS[@]}"
  wanted cuda_tests && junit_summary cuda_tests "$OUT/cuda_tests.xml"
fi

# 6. The shipped combination end to end (on the CPU in a dry run: a rehearsal).
COMBINATION=(
  tests/test_speculative_cuda.py::test_combination_is_lossless_in_float32
  tests/test_speculative_cuda.py::test_combination_in_bfloat16_with_flashinfer
  tests/test_speculative_cuda.py::test_combination_server_smoke
)
step combination 150 env FASER_GPU_CHECK_REHEARSAL="$DRY_RUN" "$PY" -m pytest -q -rs -s \
  -p no:cacheprovider -o timeout=140 --junitxml="$OUT/combination.xml" "${COMBINATION[@]}"
wanted combination && junit_summary combination "$OUT/combination.xml"

# 7. The GPU profile: cost curves into $RESULTS (itself rewrites the file as it goes), in the time
# left, less 30 s for its last measurement and the summary.
if [ "$DRY_RUN" = 1 ]; then
  step profile 120 "$PY" -m faser_sgl.sim.gpu_profile --out "$RESULTS" --dry-run --budget-s 60
else
  PROFILE_BUDGET=${PROFILE_BUDGET_S:-$(( $(left) - 30 ))}
  if [ "$PROFILE_BUDGET" -ge 30 ]; then
    step profile $(( PROFILE_BUDGET + 25 )) "$PY" -m faser_sgl.sim.gpu_profile --out "$RESULTS" --budget-s "$PROFILE_BUDGET"
  elif wanted profile; then
    record_step profile 125 0 "$OUT/profile.log" "skipped: ${PROFILE_BUDGET} s left of ${TOTAL_S}"
  fi
fi

"$PY" - "$RESULTS" "$(( $(date +%s) - START ))" <<'EOF' || true
import json, os, sys
path, secs = sys.argv[1:]
data = json.load(open(path))
chk = data.setdefault("gpu_check", {})
chk["total_s"] = int(secs)
failed = sorted(n for n, s in chk.get("steps", {}).items() if s.get("rc"))
chk["ok"] = not failed
chk["failed_steps"] = failed
json.dump(data, open(path + ".tmp", "w"), indent=1); os.replace(path + ".tmp", path)
print(f"[gpu_check] steps failed: {', '.join(failed) or 'none'}")
try:
    from faser_sgl.sim.cost_profile import CostProfile
    CostProfile.from_dict(data)
    print(f"[gpu_check] {path}: a cost profile the simulator loads")
except Exception as err:  # noqa: BLE001
    print(f"[gpu_check] {path}: not (yet) a loadable cost profile: {err}")
EOF
echo "[gpu_check] done in $(( $(date +%s) - START )) s: $RESULTS"
