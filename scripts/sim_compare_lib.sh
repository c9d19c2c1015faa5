# Sourced by scripts/validate_sim.sh and scripts/validate_sim_run.sh: replay one real run's
# arrivals in the simulator and compare the two, printing the comparison under a title.
# Needs $py (the Python to run). Usage:
#   replay_and_compare REAL_RESULTS PROFILE ACCEPTANCE SIM_DIR REPEAT_RESULTS COMPARE_MD TITLE [--cost-profile-for S=P ...]
replay_and_compare() {
  local real=$1 profile=$2 acceptance=$3 sim_dir=$4 repeat=$5 compare=$6 title=$7
  shift 7
  $py -m faser_sgl.sim --replay "$real" --cost-profile "$profile" "$@" \
    --acceptance "$acceptance" --output-dir "$sim_dir" > /dev/null
  # compare_sim_real exits non-zero when a figure is outside the tolerance: the table says which.
  $py scripts/compare_sim_real.py "$real" "$sim_dir/results.json" --real-repeat "$repeat" > "$compare" || true
  echo "== $title"; cat "$compare"
}
