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
