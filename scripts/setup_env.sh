#!/usr/bin/env bash
# Create or update the project's virtual environment, idempotently and offline-safe.
#
#   bash scripts/setup_env.sh [VENV_DIR]
#
# The venv is rebuilt only when requirements/ or this script change (a hash stamp).
# sglang goes in with --no-deps: its declared dependencies pull CUDA-only kernels that the
# CPU path never imports; requirements/lock.txt holds exactly what its front half needs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${FASER_VENV:-.venv}}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

want=$(cat requirements/lock.txt requirements/sglang.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
stamp="$VENV/.faser_env_stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] building virtual environment in $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -r requirements/lock.txt
"${PIP[@]}" install --no-deps -r requirements/sglang.txt
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # FlashInfer only where a CUDA device exists; the CPU path never imports it.
  "${PIP[@]}" install -r requirements/cuda.txt
fi
"${PIP[@]}" install --no-deps -e .
echo "$want" > "$stamp"
