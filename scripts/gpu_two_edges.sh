#!/usr/bin/env bash
# Two loadtest edges on one shared GPU server (daemon.edge_processes' shape, measured as
# a user sees it): `python -m daemon.gpu_server --listen` and two `lipsync loadtest`
# processes attached to it, each with its own producers and measured window.
# Usage on the GPU box, from the repository root (after scripts/gpu_setup.sh):
#   scripts/gpu_two_edges.sh OUT_DIR [SESSIONS_PER_EDGE] [SECONDS]
set -euo pipefail
out="${1:?output dir}"; per="${2:-12}"; seconds="${3:-60}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
export PYTHONPATH="/tmp/site:/tmp/site2:$PWD" PATH="/tmp/site/bin:/tmp/site2/bin:$PATH" PYTHONUNBUFFERED=1
export LIPSYNC_MODEL__RANDOM_WEIGHTS=1 LIPSYNC_MODEL__RANDOM_WEIGHTS_SIZE="${LIPSYNC_MODEL__RANDOM_WEIGHTS_SIZE:-full}"
export LIPSYNC_MODEL__DEVICE="${LIPSYNC_MODEL__DEVICE:-cuda}"
export LIPSYNC_MODEL__DECODE="${LIPSYNC_MODEL__DECODE:-auto}" LIPSYNC_DAEMON__MAX_SESSIONS=$((2 * per))
mkdir -p /tmp/lt /tmp/e1 /tmp/e2
cd /tmp/lt
"${PYTHON:-python3}" -c "from daemon.config import load_settings; print(load_settings('/dev/null').model_dump_json())" > gs.json
"${PYTHON:-python3}" -m daemon.gpu_server --settings gs.json --listen /tmp/lt/gpu.sock > "$out/gpu_server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 900); do [ -S /tmp/lt/gpu.sock ] && break; sleep 1; done
edges=()
for e in 1 2; do
  (cd /tmp/e$e && LIPSYNC_DAEMON__GPU_SOCKET=/tmp/lt/gpu.sock LIPSYNC_DAEMON__EDGE_NAME=edge$e \
    "${PYTHON:-python3}" -m daemon.cli --config /dev/null loadtest --sessions "$per" --seconds "$seconds" --warmup-s 5 \
    --sink livekit-local --json "$out/edge$e.json" > "$out/edge$e.log" 2>&1) &
  edges+=($!)
done
wait "${edges[@]}"
grep -h "sessions:" "$out"/edge*.log
