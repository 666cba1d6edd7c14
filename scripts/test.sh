#!/usr/bin/env bash
# Lint, type-check and test (CPU only; tiny models; the Flower simulation end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
. "$VENV/bin/activate"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
ruff check .
ruff format --check .
mypy
# Three worker processes (TEST_WORKERS; 0 runs in this process), each taking whole files: most of
# the suite's time is end-to-end runs that wait on processes they started, so on two cores two
# workers left them a third idle. Files keep their module-scoped fixtures (a federation, a
# replica) to one worker. (Which files start first made no difference: longest first, the tests
# took the same 21m46s.)
python -m pytest -n "${TEST_WORKERS:-3}" --dist loadfile --durations=15 "$@"
