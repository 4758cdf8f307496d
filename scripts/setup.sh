#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv with the project, its test extras and the
# Firestore emulator used by the tests. torch is installed first and pinned, so that no
# other package pulls another build in its place. Which torch build (CPU or CUDA) and how
# to choose it: README.md, "Setup". One line per step; pip's and npm's own output goes to
# .venv/setup.log (its end is shown when a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-}"  # e.g. https://download.pytorch.org/whl/cu130: torch from there

mkdir -p .venv
LOG=.venv/setup.log
: >"$LOG"

step() {  # step WHAT COMMAND...: runs COMMAND with its output in the log, says how it went
  local what=$1 t0=$SECONDS
  shift
  printf '%s ... ' "$what"
  if "$@" >>"$LOG" 2>&1; then
    echo "ok ($((SECONDS - t0)) s)"
  else
    echo "FAILED; the end of $LOG:"
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

if [ -x .venv/bin/python ]; then
  echo "venv: reusing .venv ($(.venv/bin/python --version))"
else
  step "venv: creating .venv with $("$PYTHON" --version)" "$PYTHON" -m venv .venv
fi
step "pip: upgrading" .venv/bin/python -m pip install -q --upgrade pip
torch_args=("$TORCH_SPEC")
[ -z "$TORCH_INDEX" ] || torch_args+=(--index-url "$TORCH_INDEX")
step "torch: installing $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX}" \
  .venv/bin/python -m pip install -q "${torch_args[@]}"
echo "$TORCH_SPEC" >.venv/torch-constraint.txt
step "project: installing it and its test extras (pip install -e '.[test]')" \
  .venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e '.[test]'
# Said after the project's install: it is also the torch that install kept.
echo "torch: $(.venv/bin/python -W ignore -c '
import torch
cuda = torch.version.cuda
print(f"{torch.__version__}, the " + (f"CUDA {cuda} build" if cuda else
      "CPU build (for the CUDA build on a GPU box: README.md, Setup)"))
' 2>>"$LOG")"
if command -v npm >/dev/null; then
  step "firestore emulator: installing (npm ci in tests/firestore)" \
    bash -c 'cd tests/firestore && npm ci --silent --no-audit --no-fund'
else
  echo "firestore emulator: npm not found, its tests will be skipped (apt-get install nodejs npm)" >&2
fi
echo "setup done: .venv ready (pip and npm output: $LOG)"
