#!/usr/bin/env bash
# The simulator against the real runs of scripts/run_sim_validation.sh (docs/simulation.md,
# "Validation on this machine"): per run, a cost profile fitted from that run's own step records
# (in situ) and one fitted from the other run (cross), the acceptance both runs recorded, a
# replay of every real request, and the comparison tables.  A minute or two.
#   bash scripts/validate_sim.sh DIR        (DIR holds run1/ and run2/)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: validate_sim.sh DIR}
py=.venv/bin/python
machine=${MACHINE:-$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores}
cat "$dir"/run*/acceptance-*.jsonl > "$dir/acceptance.jsonl"
for r in run1 run2; do
  PYTHONPATH=. $py scripts/profile_from_steps.py "$dir/$r"/steps-*.jsonl --out "$dir/profile-$r.json" \
    --name "fitted-$r" --machine "$machine" | tee "$dir/profile-$r.fit.json"
done
for r in run1 run2; do
  other=$([ $r = run1 ] && echo run2 || echo run1)
  for p in $r $other; do
    out="$dir/sim-$r-profile-$p"
    PYTHONPATH=. $py -m faser_sgl.sim --replay "$dir/$r/real/results.json" --cost-profile "$dir/profile-$p.json" \
      --acceptance "$dir/acceptance.jsonl" --output-dir "$out" --report "$out.md" > /dev/null
    PYTHONPATH=. $py scripts/compare_sim_real.py "$dir/$r/real/results.json" "$out/results.json" \
      --real-repeat "$dir/$other/real/results.json" > "$dir/compare-$r-profile-$p.md" || true
    echo "== $r replayed on profile-$p"; cat "$dir/compare-$r-profile-$p.md"
  done
done
