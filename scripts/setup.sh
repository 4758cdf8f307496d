#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv with the project, its test extras and the
# Firestore emulator used by the tests. torch is installed first and pinned, so that no
# other package pulls a multi-GB CUDA build in its place (on a GPU box, install the CUDA
# build of torch first and set TORCH_SPEC to it, e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
echo "$TORCH_SPEC" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e '.[test]'
if command -v npm >/dev/null; then
  (cd tests/firestore && npm ci --silent --no-audit --no-fund)
else
  echo "npm not found: Firestore emulator tests will be skipped (apt-get install nodejs npm)" >&2
fi
echo "setup done: .venv ready"
