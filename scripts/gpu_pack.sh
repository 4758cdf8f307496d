#!/usr/bin/env bash
# Packs the wheels of .whl/ and .whl2/ (see docs/BENCHMARKS.md, "Re-running") into one
# file that fits one device call's carry with the working tree: .whlx/wheels.tar.xz, the
# wheels unpacked and compressed with xz (about 43 MB against 66 MB of wheels, which
# with the tree exceed the carry's 64 MiB). scripts/gpu_setup.sh unpacks it on the GPU
# machine. About two minutes on the development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/wheels"
for w in .whl/*.whl .whl2/*.whl; do
  name="$(basename "$w")"; [ -d "$tmp/wheels/$name" ] && continue
  mkdir "$tmp/wheels/$name" && unzip -q "$w" -d "$tmp/wheels/$name"
done
mkdir -p .whlx
tar cf - -C "$tmp" wheels | xz -9 -T0 > .whlx/wheels.tar.xz
ls -l .whlx/wheels.tar.xz
