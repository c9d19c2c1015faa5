#!/usr/bin/env bash
# The simulator against the real runs of scripts/run_sim_validation.sh (docs/simulation.md,
# "Validation on this machine").  For each run and each source of pass costs:
#   pooled:      one profile fitted from all of a run's step records (one machine profile);
#   per-setting: each setting's own profile, fitted from the steps its server recorded
#                (--cost-profile-for), since pass costs differ with what the server holds;
# both in situ (the run's own records) and cross-run (the other run's), with the acceptance
# both runs recorded; then the comparison tables.  A few minutes.
#   bash scripts/validate_sim.sh DIR        (DIR holds run1/ and run2/)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: validate_sim.sh DIR}
py=.venv/bin/python
export PYTHONPATH=.
source scripts/sim_compare_lib.sh
machine=${MACHINE:-$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores}
cat "$dir"/run*/acceptance-*.jsonl > "$dir/acceptance.jsonl"
settings=$(ls "$dir/run1"/steps-*.jsonl | sed 's/.*steps-\(.*\)\.jsonl/\1/')
mkdir -p "$dir/profiles"
for r in run1 run2; do
  $py scripts/profile_from_steps.py "$dir/$r"/steps-*.jsonl --out "$dir/profiles/$r.json" \
    --name "fitted-$r" --machine "$machine" > "$dir/profiles/$r.fit.json"
  for s in $settings; do
    # (the pooled profile fills in what a setting never ran, e.g. the draft for none)
    $py scripts/profile_from_steps.py "$dir/$r/steps-$s.jsonl" --base "$dir/profiles/$r.json" \
      --out "$dir/profiles/$r-$s.json" --name "fitted-$r-$s" --machine "$machine" > "$dir/profiles/$r-$s.fit.json"
  done
done
for r in run1 run2; do
  other=$([ $r = run1 ] && echo run2 || echo run1)
  for p in $r $other; do
    for kind in pooled per-setting; do
      extra=()
      if [ $kind = per-setting ]; then
        for s in $settings; do extra+=(--cost-profile-for "$s=$dir/profiles/$p-$s.json"); done
      fi
      name="$r-on-$p-$kind"
      replay_and_compare "$dir/$r/real/results.json" "$dir/profiles/$p.json" "$dir/acceptance.jsonl" \
        "$dir/sim/$name" "$dir/$other/real/results.json" "$dir/compare-$name.md" \
        "$r replayed on $p's $kind profiles" "${extra[@]}"
    done
  done
done
