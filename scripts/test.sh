#!/usr/bin/env bash
# The test suite (CPU, tiny random-weight models, real nats-server and Firestore emulator).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run ./scripts/setup.sh first" >&2; exit 2; }
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
