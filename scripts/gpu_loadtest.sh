#!/usr/bin/env bash
# Runs `lipsync loadtest --find-capacity` on a GPU machine whose Python has torch but not
# this project's other dependencies: they come as wheels in .whl/ (see docs/BENCHMARKS.md
# for how they were fetched; nvidia-ml-py among them, or the GPU busy figure is absent).
# Usage on the GPU box, from the repository root:
#   scripts/gpu_loadtest.sh OUT_DIR [SESSIONS] [SECONDS] [extra env assignments...]
# SESSIONS (default 1,8,12,16,20,24) are tried in order until a count fails the SLO
# (every session >= 99 % of needed frames generated in time, p95 latency <= 180 ms); each
# session speaks for a 5 s warm-up plus SECONDS (default 60) measured, published through
# the real LiveKit sources without a room (output.sink livekit-local). Writes
# OUT_DIR/loadtest.json and OUT_DIR/loadtest.log.
set -euo pipefail
out="${1:?output dir}"; sessions="${2:-1,8,12,16,20,24}"; seconds="${3:-60}"
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out" && out="$(cd "$out" && pwd)"
[ -d /tmp/site/diffusers ] && [ -d /tmp/site2/livekit ] || "$(dirname "$0")/gpu_setup.sh"
export PYTHONPATH="/tmp/site:/tmp/site2:$PWD" PATH="/tmp/site/bin:/tmp/site2/bin:$PATH" PYTHONUNBUFFERED=1
mkdir -p /tmp/lt && cd /tmp/lt
env LIPSYNC_MODEL__RANDOM_WEIGHTS=1 LIPSYNC_MODEL__RANDOM_WEIGHTS_SIZE=full LIPSYNC_MODEL__DEVICE=cuda "$@" \
  python3 -m daemon.cli --config /dev/null loadtest --find-capacity --sessions "$sessions" \
  --seconds "$seconds" --warmup-s 5 --sink livekit-local --json "$out/loadtest.json" 2>&1 \
  | tee "$out/loadtest.log" | grep --line-buffered -v -i "warn\|Loading\|Writing\|float32\|stalled"
