#!/usr/bin/env bash
# The simulator against one load-harness run with repeats (issue 25: re-validation at the loads of
# docs/results.md).  The run must have used --repeats 2 --record-steps, and its speculative
# settings --faser-record-acceptance RUN_DIR/acceptance/<setting>.jsonl.  A few minutes.
#   bash scripts/validate_sim_run.sh RUN_DIR OUT_DIR
# For each repeat r (run1, run2: the run's records of that repeat), the simulator replays its
# requests with
#   pooled:      one profile fitted from every setting's step records (one machine profile);
#   per-setting: each setting's own profile (--cost-profile-for), the pooled one filling in what
#                a setting never ran;
# and the acceptance every speculative server recorded; compare_sim_real.py then sets each
# simulated/real ratio beside the other repeat's ratio to this one (the real runs' own spread).
# Both repeats were served by the same server per setting, so the profiles are fitted once.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:?usage: validate_sim_run.sh RUN_DIR OUT_DIR}
out=${2:?usage: validate_sim_run.sh RUN_DIR OUT_DIR}
py=.venv/bin/python
export PYTHONPATH=.
source scripts/sim_compare_lib.sh
machine=${MACHINE:-$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores}
mkdir -p "$out/profiles"
$py - "$run/results.json" "$out" <<'EOF'
import json, sys
from pathlib import Path
data = json.loads(Path(sys.argv[1]).read_text())
for r in sorted({rec.get("repeat", 0) for rec in data["results"]}):
    d = Path(sys.argv[2]) / f"run{r + 1}"
    d.mkdir(parents=True, exist_ok=True)
    rows = [rec for rec in data["results"] if rec.get("repeat", 0) == r]
    (d / "results.json").write_text(json.dumps({"meta": data["meta"], "results": rows}))
EOF
cat "$run"/acceptance/*.jsonl > "$out/acceptance.jsonl"
settings=$(ls "$run"/steps/*.jsonl | sed 's#.*/\(.*\)\.jsonl#\1#')
$py scripts/profile_from_steps.py "$run"/steps/*.jsonl --out "$out/profiles/pooled.json" \
  --name fitted-pooled --machine "$machine" > "$out/profiles/pooled.fit.json"
extra=()
for s in $settings; do
  $py scripts/profile_from_steps.py "$run/steps/$s.jsonl" --base "$out/profiles/pooled.json" \
    --out "$out/profiles/$s.json" --name "fitted-$s" --machine "$machine" > "$out/profiles/$s.fit.json"
  extra+=(--cost-profile-for "$s=$out/profiles/$s.json")
done
for r in run1 run2; do
  other=$([ $r = run1 ] && echo run2 || echo run1)
  for kind in pooled per-setting; do
    args=()
    [ $kind = per-setting ] && args=("${extra[@]}")
    replay_and_compare "$out/$r/results.json" "$out/profiles/pooled.json" "$out/acceptance.jsonl" \
      "$out/sim/$r-$kind" "$out/$other/results.json" "$out/compare-$r-$kind.md" \
      "$r replayed on the $kind profiles" "${args[@]}"
  done
done
