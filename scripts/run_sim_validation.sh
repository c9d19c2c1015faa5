#!/usr/bin/env bash
# The simulator's validation runs (docs/simulation.md, "Validation on this machine"): the real load
# harness, twice with identical arrivals (the real runs' own spread), each server recording its
# steps (for an in-situ cost profile) and its acceptance; then a chat-style acceptance recording.
# Radix cache off: the simulator does not model the prefix cache.  About 60 minutes on 2 cores;
# run it alone on the machine.
#   bash scripts/run_sim_validation.sh OUT_DIR [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: run_sim_validation.sh OUT_DIR [REPEATS]}
repeats=${2:-2}
py=.venv/bin/python
mkdir -p "$out"
for r in $(seq 1 "$repeats"); do
  d="$out/run$r"
  mkdir -p "$d"
  PYTHONPATH=. $py -m faser_sgl.bench --server-args=--disable-radix-cache \
    --setting "none=--speculative-policy none --faser-record-steps $d/steps-none.jsonl" \
    --setting "fixed-k2=--speculative-policy fixed --speculative-num-draft-tokens 2 --faser-record-acceptance $d/acceptance-fixed-k2.jsonl --faser-record-steps $d/steps-fixed-k2.jsonl" \
    --setting "adaptive-k4=--speculative-policy adaptive --speculative-num-draft-tokens 4 --faser-record-acceptance $d/acceptance-adaptive-k4.jsonl --faser-record-steps $d/steps-adaptive-k4.jsonl" \
    --request-rates 0.1,0.2 --num-prompts 30 --bursty-num-prompts 0 --output-len 32 \
    --output-dir "$d/real" --report "$d/real.md" --no-progress
done
d="$out/chat"
mkdir -p "$d"
PYTHONPATH=. $py -m faser_sgl.bench --dataset chat --server-args=--disable-radix-cache \
  --setting "fixed-k4=--speculative-policy fixed --speculative-num-draft-tokens 4 --faser-record-acceptance $d/acceptance-chat-fixed-k4.jsonl" \
  --baseline fixed-k4 --request-rates 1.0 --num-prompts 40 --bursty-num-prompts 0 --output-len 48 \
  --output-dir "$d/real" --report "$d/real.md" --no-progress
