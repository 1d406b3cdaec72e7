#!/usr/bin/env bash
# Set up and run the whole test suite (CPU; a local 2-CPU Ray cluster is started by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"
