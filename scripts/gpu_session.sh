#!/usr/bin/env bash
# One GPU call's measurements, in order, each step's output under OUT_DIR (a progress file
# says where it is): start it detached, then poll, since it runs longer than one call:
#   setsid nohup scripts/gpu_session.sh /tmp/res [STEPS...] > /tmp/res.log 2>&1 &
# Steps (default: audio ref lt):
#   audio  python -m musetalk.audio_gpu: audio rounds (whole / pruned / graphed encoder)
#   astages  the audio encoder's device ms per batch of $AUDIO_SLOTS (default 12,24): eager,
#          CUDA graph, compiled CUDA graph, and the three forms' tokens compared (a minute)
#   ref    MuseTalk's reference flow (the 4x target's baseline), 500 frames
#   lt     lipsync loadtest, sessions $LT_SESSIONS (default 4,16,20,24; the first row
#          prepares the four avatars and is not a measurement), 60 s each
#   lt10   the same with model.audio_round_ms = 10 (rounds twice as often), sessions
#          $LT10_SESSIONS (default 20,22), in a second process (the compile cache is warm)
#   lt-TAG the loadtest in a process of its own with the settings in $LT_TAG_ENV (TAG upper-
#          cased, '-' as '_'; words like LIPSYNC_MODEL__BUCKET_STEP=2) and sessions
#          $LT_TAG_SESSIONS (default 4,20,22), its command-line words in $LT_TAG_ARGS (else
#          $LT_ARGS), into lt-TAG.json: e.g. step lt-u90 with
#          LT_U90_ENV="LIPSYNC_MODEL__BATCH_UTILIZATION=0.9" LT_U90_SESSIONS=22,24
#   two    two loadtest edges of 12 sessions on one GPU server (scripts/gpu_two_edges.sh)
#   sb     the step's upsampling forms, subpixel against transposed, with a kernel profile
#          (musetalk.step_bench, batches $SB_BATCHES, default 16,24; about 4 minutes)
#   sbc    the step with the cropped decode from face row 96 against 108 (model.decode_crop_row_high's
#          second plan), transposed upsampling, batches $SBC_BATCHES (default 16; about 4 minutes)
#   sba    Inductor's max_autotune (Triton templates benchmarked against cuDNN/cuBLAS) against
#          the daemon's step (transposed upsampling, crop from row 108), batches $SBA_BATCHES
#          (default 12), with a kernel profile; the autotuned compile may take minutes
#   sbk    the norms' and pointwise kernels tuned (a third of a step): transposed + crop108
#          against +autotune_pw (Inductor's max_autotune_pointwise) and +cdt (its
#          coordinate_descent_tuning), batches $SBK_BATCHES (default 16), with a kernel profile
#   ov     the next step's UNet on a second stream under this step's decode, against the
#          two one after the other (musetalk.overlap_bench, batches $OV_BATCHES, default
#          12,16; the compiles included, about 3 minutes by estimate)
#   pick   the faster form of sb's largest batch becomes model.upsample for the later steps
#   up     the upsampling forms alone (python -m musetalk.subpixel; under a minute)
#   tests  the CUDA tests (pytest -m gpu --noconftest)
# Extra LIPSYNC_* variables in the environment reach the loadtest's daemon.
# Needs scripts/gpu_setup.sh first (the wheels in /tmp/site and /tmp/site2).
set -u
out="${1:?output dir}"; shift
mkdir -p "$out" /tmp/lt && out="$(cd "$out" && pwd)"
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="/tmp/site:/tmp/site2:$root" PATH="/tmp/site/bin:/tmp/site2/bin:$PATH" PYTHONUNBUFFERED=1
export LIPSYNC_MODEL__RANDOM_WEIGHTS=1 LIPSYNC_MODEL__RANDOM_WEIGHTS_SIZE=full LIPSYNC_MODEL__DEVICE=cuda
say() { echo "$(date -u +%T) $*" >> "$out/progress"; }
# loadtest NAME LIMIT_S SESSIONS [VAR=value ...]: one loadtest process into NAME.json/.log;
# $LT_ARGS (words) go to its command line, e.g. LT_ARGS=--voiced-only (every frame voiced);
# after a `ref` step its rows are compared with the reference flow (--reference-flow)
ref_flow() {  # the words, where this run's ref step wrote a report the loadtest takes (a bad one would stop it)
  (cd "$root" && python3 -c "import sys; from pathlib import Path; from daemon.loadtest import read_reference_flow; \
read_reference_flow(Path(sys.argv[1])); print('--reference-flow', sys.argv[1])" "$out/ref.json" 2>/dev/null)
}
loadtest() {
  local name="$1" limit="$2" sessions="$3"; shift 3
  (cd /tmp/lt && env "$@" timeout "$limit" python3 -m daemon.cli --config /dev/null loadtest --sessions "$sessions" \
    --seconds 60 --warmup-s 5 --sink livekit-local --stall-dump-ms 60 ${LT_ARGS:-} \
    $(ref_flow) --json "$out/$name.json") \
    > "$out/$name.log" 2>&1
}
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(audio ref lt)
# The code by content (this machine's .git may be older than its files).
say "source $(cd "$root" && python3 -c 'from daemon.loadtest import source_digest; print(source_digest())' 2>&1 | tail -1)"
for step in "${steps[@]}"; do
  say "start $step"
  case "$step" in
    audio) (cd "$root" && timeout 300 python3 -m musetalk.audio_gpu --device cuda --chunks-ms 40 \
             --slots "${AUDIO_SLOTS:-8,12,24}" --rounds 30 --profile 10) > "$out/audio.log" 2>&1 ;;
    astages) (cd "$root" && timeout 240 python3 -m musetalk.audio_gpu --device cuda --chunks-ms 40 \
             --slots "${AUDIO_SLOTS:-12,24}" --stages-only) > "$out/astages.log" 2>&1 ;;
    ref) (cd "$root" && timeout 300 python3 -m musetalk.bench --device cuda --reference-flow --frames 500 \
           --json "$out/ref.json") > "$out/ref.log" 2>&1 ;;
    lt) loadtest lt 1200 "${LT_SESSIONS:-4,16,20,24}" ;;
    lt10) loadtest lt10 900 "${LT10_SESSIONS:-20,22}" LIPSYNC_MODEL__AUDIO_ROUND_MS=10 ;;
    lt-*) tag="$(echo "${step#lt-}" | tr 'a-z-' 'A-Z_')"; envs="LT_${tag}_ENV"; sess="LT_${tag}_SESSIONS"
          args="LT_${tag}_ARGS"
          say "$step: ${!envs:-} ${!args:-} sessions ${!sess:-4,20,22}"
          LT_ARGS="${!args:-${LT_ARGS:-}}" loadtest "$step" 1500 "${!sess:-4,20,22}" ${!envs:-} ;;
    two) (cd "$root" && timeout 600 bash scripts/gpu_two_edges.sh "$out/two" 12) > "$out/two.log" 2>&1 ;;
    sb) (cd "$root" && timeout 600 python3 -m musetalk.step_bench --variants subpixel,transposed --batches "${SB_BATCHES:-16,24}" \
          --steps 20 --profile 5 --timeout-s 290 --json "$out/sb.json") > "$out/sb.log" 2>&1 ;;
    sbc) (cd "$root" && timeout 600 python3 -m musetalk.step_bench --variants transposed,transposed+crop108 \
           --batches "${SBC_BATCHES:-16}" --steps 20 --timeout-s 290 --json "$out/sbc.json") > "$out/sbc.log" 2>&1 ;;
    sba) (cd "$root" && timeout 900 python3 -m musetalk.step_bench --variants transposed+crop108,transposed+crop108+autotune \
           --batches "${SBA_BATCHES:-12}" --steps 20 --profile 5 --timeout-s 600 --json "$out/sba.json") > "$out/sba.log" 2>&1 ;;
    sbk) (cd "$root" && timeout 900 python3 -m musetalk.step_bench \
           --variants transposed+crop108,transposed+crop108+autotune_pw,transposed+crop108+cdt \
           --batches "${SBK_BATCHES:-16}" --steps 20 --profile 5 --timeout-s 420 --json "$out/sbk.json") > "$out/sbk.log" 2>&1 ;;
    ov) (cd "$root" && timeout 420 python3 -m musetalk.overlap_bench --batches "${OV_BATCHES:-12,16}" --steps 50 \
          --json "$out/ov.json") > "$out/ov.log" 2>&1 ;;
    pick) form=$(python3 -c "import json,sys; r=[v for v in json.load(open(sys.argv[1])) if v.get('rows')]; \
print(min(r, key=lambda v: v['rows'][-1]['step_ms'])['variant'] if r else '')" "$out/sb.json" 2>/dev/null)
          [ -n "$form" ] && export LIPSYNC_MODEL__UPSAMPLE="$form"; say "model.upsample: ${LIPSYNC_MODEL__UPSAMPLE:-default}" ;;
    up) (cd "$root" && timeout 200 python3 -m musetalk.subpixel --iters 20) > "$out/up.log" 2>&1 ;;
    tests) (cd "$root" && timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu --noconftest \
             tests/test_audio_gpu.py tests/test_engine.py tests/test_overlap_bench.py) > "$out/tests.log" 2>&1 ;;
    *) say "unknown step $step"; continue ;;
  esac
  say "done $step rc=$?"
done
say "all done"
