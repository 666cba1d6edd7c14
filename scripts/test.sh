#!/usr/bin/env bash
# Lint, type-check and test (CPU only; tiny models; the Flower simulation end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
. "$VENV/bin/activate"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
ruff check .
ruff format --check .
# mypy (over a minute from a cold cache) runs beside the tests, on the cycles they leave idle
# while they wait on the processes they start; its result counts as much as theirs.
mypy_log=$(mktemp)
mypy >"$mypy_log" 2>&1 &
mypy_pid=$!
trap '[ -z "$mypy_pid" ] || kill "$mypy_pid" 2>/dev/null || true; rm -f "$mypy_log"' EXIT
trap 'exit 130' INT TERM  # (a background job ignores Ctrl-C: the EXIT trap stops mypy)
# Three worker processes (TEST_WORKERS; 0 runs in this process), each taking whole files: most of
# the suite's time is end-to-end runs that wait on processes they started, so on two cores two
# workers left them a third idle (four made every test slower: 21m33s against 20m29s). Files keep
# their module-scoped fixtures (a federation, a replica) to one worker. (Which files start first
# made no difference: longest first, the tests took the same 21m46s.)
tests=0
python -m pytest -n "${TEST_WORKERS:-3}" --dist loadfile --durations=15 "$@" || tests=$?
typed=0
wait "$mypy_pid" || typed=$?
mypy_pid=""
echo "mypy:"
cat "$mypy_log"
if [ "$typed" -ne 0 ]; then
  echo "mypy failed (exit $typed)" >&2
fi
exit $((tests != 0 ? tests : typed))
