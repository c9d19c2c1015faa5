#!/usr/bin/env bash
# One command for a borrowed GPU machine (docs/gpu_check.md):
#
#   bash scripts/gpu_check.sh              on the device, with wheelhouse/ carried (make wheelhouse)
#   bash scripts/gpu_check.sh --dry-run    on a CPU: tiny shapes, no install, no CUDA tests
#
# Writes ONE results file, $OUT/gpu_check.json (OUT defaults to ./gpu_check_out): a cost profile
# the simulator loads (--cost-profile $OUT/gpu_check.json) with the measurements under
# "gpu_profile" and this script's steps (environment, install, CUDA tests) under "gpu_check";
# the raw logs lie beside it.  It is rewritten after every step and every measurement, so a
# run cut short leaves what was done.  Every step has its own timeout; the whole run stays under
# TOTAL_S (default 450 s, i.e. 7.5 minutes).
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
TOTAL_S=${TOTAL_S:-450}
START=$(date +%s)
SITE="$PWD/wheelhouse/site"   # where missing wheels go (pip --target; ignored by git), first on PYTHONPATH
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DRY_RUN
[ -d wheelhouse/tiny_models ] && export FASER_SGL_TEST_CACHE="$PWD/wheelhouse/tiny_models"
rm -f "$RESULTS"

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# record_step NAME RC SECONDS LOG [NOTE]: merge one step into the results file's "gpu_check".
record_step() {
  "$PY" - "$RESULTS" "$@" <<'EOF' || echo "[gpu_check] could not record step $2" >&2
import json, os, sys, time
path, name, rc, secs, log = sys.argv[1:6]
note = sys.argv[6] if len(sys.argv) > 6 else ""
try:
    data = json.load(open(path))
except (OSError, ValueError):
    data = {}
chk = data.setdefault("gpu_check", {"steps": {}})
chk.setdefault("steps", {})[name] = {"rc": int(rc), "seconds": int(secs), "log": os.path.basename(log),
                                     **({"note": note} if note else {})}
chk["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
os.replace(tmp, path)
EOF
}

# step NAME TIMEOUT_S CMD...: run with its own timeout, log to $OUT/NAME.log, record rc and time.
step() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" t0 rc
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
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out after ${limit} s"
  record_step "$name" "$rc" "$(( $(date +%s) - t0 ))" "$log" "$note"
  tail -n 3 "$log" | sed "s/^/[gpu_check]   /"
  return 0
}

# 1. Environment: torch / CUDA / GPU.
step environment 60 "$PY" - <<'EOF'
import json, platform, shutil, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "nvcc": shutil.which("nvcc")}
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
"$PY" - "$RESULTS" "$OUT/environment.log" <<'EOF' || true
import json, os, sys
path, log = sys.argv[1:]
try:
    env = json.loads(open(log).read())
except (OSError, ValueError):
    env = {"unparsed": True}
data = json.load(open(path)) if os.path.exists(path) else {}
data.setdefault("gpu_check", {})["environment"] = env
data["gpu_check"]["dry_run"] = os.environ.get("DRY_RUN") == "1"
json.dump(data, open(path + ".tmp", "w"), indent=1); os.replace(path + ".tmp", path)
EOF

# 2. Install the wheelhouse offline: only the distributions this Python lacks, into $SITE.
if [ "$DRY_RUN" = 1 ]; then
  record_step install 0 0 "$OUT/install.log" "skipped: dry run (the CPU venv has everything)"
elif [ ! -d wheelhouse ]; then
  record_step install 1 0 "$OUT/install.log" "no wheelhouse/: build it with make wheelhouse and carry it"
else
  step install 120 bash -c '
    set -e
    missing=$("$0" - <<EOF
import importlib.metadata as md, pathlib, re
for whl in sorted(pathlib.Path("wheelhouse").glob("*.whl")):
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
      chmod +x "$1"/ninja/data/bin/* 2>/dev/null || true
    fi
    "$0" -c "import flashinfer, tvm_ffi, safetensors, pytest; print(\"flashinfer\", flashinfer.__version__)"
  ' "$PY" "$SITE"
fi

# 3. The GPU profile: cost curves into $RESULTS (itself rewrites the file as it goes).
PROFILE_BUDGET=${PROFILE_BUDGET_S:-240}
if [ "$DRY_RUN" = 1 ]; then
  step profile 240 "$PY" -m faser_sgl.sim.gpu_profile --out "$RESULTS" --dry-run --budget-s 60
else
  # The process limit leaves the profiler's own budget room for its last measurement.
  step profile $(( PROFILE_BUDGET + 60 )) "$PY" -m faser_sgl.sim.gpu_profile --out "$RESULTS" --budget-s "$PROFILE_BUDGET"
fi

# 4. The CUDA tests: FlashInfer vs torch attention, Triton kernels vs torch, the speculative
# step, CUDA streams / green contexts, early exit on CUDA, the profiler on a small shape.
CUDA_TESTS=(
  tests/test_executor_flashinfer.py
  tests/test_kernels_triton_equivalence.py::test_triton_matches_reference_on_cuda
  tests/test_kernels_triton_equivalence.py::test_dispatcher_uses_triton_on_cuda
  tests/test_speculative_cuda.py
  tests/test_frontier_pipeline.py::test_cuda_streams_and_green_contexts_keep_greedy_output
  tests/test_gpu_check.py::test_profiler_on_cuda_small_shape
  tests/test_gpu_check.py::test_early_exit_keeps_greedy_output_on_cuda
)
if [ "$DRY_RUN" = 1 ]; then
  record_step cuda_tests 0 0 "$OUT/cuda_tests.log" "skipped: dry run on a CPU (no CUDA device)"
else
  step cuda_tests 240 "$PY" -m pytest -q -rs -p no:cacheprovider -o timeout=200 \
    --junitxml="$OUT/cuda_tests.xml" "${CUDA_TESTS[@]}"
  "$PY" - "$RESULTS" "$OUT/cuda_tests.xml" <<'EOF' || true
import json, os, sys, xml.etree.ElementTree as ET
path, xml = sys.argv[1:]
summary = {}
try:
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    summary = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError, AttributeError) as err:
    summary = {"unparsed": repr(err)}
data = json.load(open(path)) if os.path.exists(path) else {}
data.setdefault("gpu_check", {})["cuda_tests"] = summary
json.dump(data, open(path + ".tmp", "w"), indent=1); os.replace(path + ".tmp", path)
EOF
fi

"$PY" - "$RESULTS" "$(( $(date +%s) - START ))" <<'EOF' || true
import json, os, sys
path, secs = sys.argv[1:]
data = json.load(open(path))
data.setdefault("gpu_check", {})["total_s"] = int(secs)
json.dump(data, open(path + ".tmp", "w"), indent=1); os.replace(path + ".tmp", path)
try:
    from faser_sgl.sim.cost_profile import CostProfile
    CostProfile.from_dict(data)
    print(f"[gpu_check] {path}: a cost profile the simulator loads")
except Exception as err:  # noqa: BLE001
    print(f"[gpu_check] {path}: not (yet) a loadable cost profile: {err}")
EOF
echo "[gpu_check] done in $(( $(date +%s) - START )) s: $RESULTS"
