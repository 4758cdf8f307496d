#!/usr/bin/env bash
# One device call that outlives nothing it needs: installs the wheels once
# (scripts/gpu_setup.sh, skipped while /tmp/site exists), starts scripts/gpu_session.sh
# with STEPS detached (unless this machine's /tmp/res already has a run), and copies
# /tmp/res to $OUT/res.tgz every 20 s and at the end, so that a call cut short by its
# limit or the device time still brings back what was measured. Waits until the session
# says "all done" or POLL_N x 5 s have passed (default 110: within a 600 s call). Call it
# again from the next call, within 30 s, to go on polling the same run.
#   scripts/gpu_call.sh lt ref          (LT_* variables as scripts/gpu_session.sh reads them)
set -u
out="${OUT:?OUT: the output folder of the device call}"
[ -d /tmp/site ] || bash scripts/gpu_setup.sh > /tmp/setup.log 2>&1
mkdir -p /tmp/res
nvidia-smi --query-gpu=name,driver_version --format=csv > /tmp/res/gpu.txt 2>&1
if ! grep -q "start" /tmp/res/progress 2>/dev/null; then
  setsid nohup bash scripts/gpu_session.sh /tmp/res "$@" > /tmp/res.log 2>&1 < /dev/null &
fi
keep() { tar czf "$out/.res.tgz" -C /tmp res 2>/dev/null && mv "$out/.res.tgz" "$out/res.tgz"; }
for i in $(seq "${POLL_N:-110}"); do
  grep -q "all done" /tmp/res/progress 2>/dev/null && break
  sleep 5
  [ $((i % 4)) = 0 ] && keep
done
cat /tmp/res/progress 2>/dev/null
keep
# KEEP_CACHE=1: once the run is done, its compile cache comes back too (xz, when it packs
# to at most CACHE_MAX_MB, default 40); carried as .gpucache/ beside .whlx, the next fresh
# machine's first daemon start reads it (scripts/gpu_setup.sh) instead of compiling.
if [ "${KEEP_CACHE:-0}" = 1 ] && grep -q "all done" /tmp/res/progress 2>/dev/null \
   && [ -d /tmp/lt/state/compile-cache ] && [ ! -f "$out/compile-cache.tar.xz" ]; then
  tar cf - -C /tmp/lt/state compile-cache | xz -T0 -3 > /tmp/compile-cache.tar.xz
  size_mb=$(( $(stat -c %s /tmp/compile-cache.tar.xz) / 1048576 ))
  if [ "$size_mb" -le "${CACHE_MAX_MB:-40}" ]; then
    mv /tmp/compile-cache.tar.xz "$out/compile-cache.tar.xz"
  fi
  echo "compile cache: $(du -sm /tmp/lt/state/compile-cache | cut -f1) MB, packed ${size_mb} MB" \
       "($( [ -f "$out/compile-cache.tar.xz" ] && echo brought back || echo "over ${CACHE_MAX_MB:-40} MB: left"))"
fi
