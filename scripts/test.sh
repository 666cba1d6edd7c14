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
tests_pid=""
# A signal stops everything this started. (bash runs a trap only once the foreground command has
# ended, so the tests run in the background too, and the script waits for them.)
tree() {  # the given processes and every process under them, from one listing of them all
  ps -eo pid=,ppid= | awk -v roots="$*" '
    { parent[$1] = $2 }
    END {
      n = split(roots, queue, " ")
      for (i = 1; i <= n; i++) { seen[queue[i]] = 1; print queue[i] }
      for (i = 1; i <= n; i++)
        for (p in parent)
          if (parent[p] == queue[i] && !(p in seen)) { seen[p] = 1; queue[++n] = p; print p }
    }'
}
running() {  # those of the given processes still running (an exited child of this script's,
  local pid state  # not yet waited for, is not)
  for pid in "$@"; do
    state=$(ps -o stat= -p "$pid" 2>/dev/null) || continue
    case $state in Z*) ;; *) echo "$pid" ;; esac
  done
}
stop_everything() {  # $1: "forward" to pass a signal on to the tests as a Ctrl-C
  trap '' INT TERM  # (a second Ctrl-C must not cut the stopping short)
  local pids workers
  # The tests' workers and the servers they started (some in sessions of their own), listed
  # before any of them ends: a server whose test process ended first is no longer under it.
  pids=$(tree $tests_pid $mypy_pid) || pids="$tests_pid $mypy_pid"
  [ -z "$mypy_pid" ] || kill -TERM "$mypy_pid" 2>/dev/null || true
  if [ -n "$tests_pid" ]; then
    # pytest first stops as on a Ctrl-C (at a terminal it got one already): its fixtures'
    # teardown stops what the tests started, also what left their process tree (a SuperLink)
    if [ "${1:-}" = forward ]; then
      workers=$(ps -o pid= --ppid "$tests_pid" 2>/dev/null) || workers=""
      kill -INT $tests_pid $workers 2>/dev/null || true
    fi
    for _ in $(seq 120); do  # up to 60 s
      [ -n "$(running "$tests_pid")" ] || break
      sleep 0.5
    done
  fi
  pids=$(running $pids)
  if [ -n "$pids" ]; then  # what is left of them
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 60); do  # up to 30 s for the servers to stop on their own
      pids=$(running $pids)
      [ -n "$pids" ] || break
      sleep 0.5
    done
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  fi
  wait || true
  tests_pid="" mypy_pid=""
}
trap 'stop_everything; exit 130' INT
trap 'stop_everything forward; exit 143' TERM
trap '[ -z "$tests_pid$mypy_pid" ] || stop_everything; rm -f "$mypy_log"' EXIT
# Three worker processes (TEST_WORKERS; 0 runs in this process), each taking whole files: most of
# the suite's time is end-to-end runs that wait on processes they started, so on two cores two
# workers left them a third idle (four made every test slower: 21m33s against 20m29s). Files keep
# their module-scoped fixtures (a federation, a replica) to one worker. (Which files start first
# made no difference: longest first, the tests took the same 21m46s.)
# (Ctrl-C reaches the tests as at a terminal: a background job would otherwise ignore it; and
# they keep the script's stdin, which a background job would otherwise lose: --pdb reads it.)
(trap - INT && exec python -m pytest -n "${TEST_WORKERS:-3}" --dist loadfile --durations=15 "$@") <&0 &
tests_pid=$!
tests=0
wait "$tests_pid" || tests=$?
tests_pid=""
typed=0
wait "$mypy_pid" || typed=$?
mypy_pid=""
echo "mypy:"
cat "$mypy_log"
if [ "$typed" -ne 0 ]; then
  echo "mypy failed (exit $typed)" >&2
fi
exit $((tests != 0 ? tests : typed))
