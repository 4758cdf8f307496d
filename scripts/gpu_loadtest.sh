#!/usr/bin/env bash
# Runs `lipsync loadtest` on a GPU machine whose Python has torch but not this project's
# other dependencies: they come as wheels in .whl/ (see docs/BENCHMARKS.md for how they
# were fetched). Usage on the GPU box, from the repository root:
#   scripts/gpu_loadtest.sh OUT_DIR [SESSIONS] [SECONDS] [extra env assignments...]
set -euo pipefail
out="${1:?output dir}"; sessions="${2:-1,4,8,12,16}"; seconds="${3:-12}"
shift $(( $# < 3 ? $# : 3 ))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
mkdir -p /tmp/lt && cd /tmp/lt
env LIPSYNC_MODEL__RANDOM_WEIGHTS=1 LIPSYNC_MODEL__RANDOM_WEIGHTS_SIZE=full LIPSYNC_MODEL__DEVICE=cuda "$@" \
  python3 -m daemon.cli --config /dev/null loadtest --sessions "$sessions" --seconds "$seconds" \
  --json "$out/loadtest.json" 2>&1 | tee "$out/loadtest.log" | grep -v -i "warn\|Loading\|Writing\|float32\|^{"
