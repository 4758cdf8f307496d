#!/usr/bin/env bash
# The GPU benches that need no loadtest, in one device call of under 10 minutes: the audio
# rounds (incremental against whole-STFT log-mel, an encoder profile), the step's
# upsampling forms (subpixel against transposed, with a kernel profile) and MuseTalk's
# reference flow. Needs only the wheels without av and livekit (about 11 MB: .whl without
# av), so one carry does:
#   bash scripts/gpu_benches.sh WHEEL_DIR OUT_DIR
# Each bench writes its log (and JSON) under OUT_DIR; a bench past its time limit is cut
# off and the next one runs. Limits in seconds: AUDIO_S, SB_S (SB_VARIANT_S a variant),
# REF_S (0: skip the reference flow). BENCHES picks the benches and their order (default
# "audio sb ref"; e.g. BENCHES="sb audio" when little device time is left).
set -u
wheels="${1:?wheel dir}"; out="${2:?output dir}"
mkdir -p "$out"
python3 -m pip uninstall -y -q peft 2>/dev/null || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
  || { echo "gpu_benches: wheel install failed" >&2; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/device.txt"
date -u +'start %FT%TZ' | tee -a "$out/device.txt"
for bench in ${BENCHES:-audio sb ref}; do
  case "$bench" in
    audio) timeout "${AUDIO_S:-150}" python3 -m musetalk.audio_gpu --device cuda --chunks-ms 40 \
             --slots "${AUDIO_SLOTS:-12,24}" --rounds 30 --profile 10 > "$out/audio.log" 2>&1
           echo "audio rc=$?"; grep -E '^(round|stages|encoder profile|graphed)' "$out/audio.log" ;;
    sb) timeout "${SB_S:-330}" python3 -m musetalk.step_bench --variants subpixel,transposed \
          --batches "${SB_BATCHES:-16,24}" --steps 20 --profile 5 --timeout-s "${SB_VARIANT_S:-160}" \
          --json "$out/sb.json" > "$out/sb.log" 2>&1
        echo "sb rc=$?"; cat "$out/sb.log" ;;
    ref) [ "${REF_S:-100}" = 0 ] && continue  # REF_S=0: no reference flow
         timeout "${REF_S:-100}" python3 -m musetalk.bench --device cuda --reference-flow --frames 500 \
           --json "$out/ref.json" > "$out/ref.log" 2>&1
         echo "ref rc=$?"; tail -4 "$out/ref.log" ;;
    *) echo "gpu_benches: unknown bench $bench (audio, sb, ref)" >&2 ;;
  esac
done
date -u +'end %FT%TZ' | tee -a "$out/device.txt"
