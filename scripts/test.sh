#!/usr/bin/env bash
# Set up the machine, then run the gate in order, stopping at the first failure:
#   ruff check -> ruff format --check -> mypy -> lint-imports -> pytest
# Extra arguments go to pytest:  ./scripts/test.sh -k whiteout -x
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

"$repo/scripts/setup.sh"

bin=$repo/.venv/bin
# Tools and the daemon subprocesses that tests start come from the venv.
export PATH="$bin:$PATH"

step=""
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ -n "$step" ]; then
        printf '\n==> GATE FAILED at: %s (exit %d)\n' "$step" "$rc"
    fi
}
trap on_exit EXIT

run_step() {
    step=$1
    shift
    printf '\n==> %s\n' "$step"
    "$@"
}

run_step "ruff check" "$bin/ruff" check .
run_step "ruff format --check" "$bin/ruff" format --check .
run_step "mypy" "$bin/mypy"
run_step "lint-imports" "$bin/lint-imports"

step="pytest"
printf '\n==> pytest\n'
rc=0
"$bin/python" -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    step=""
    printf '\n==> GATE FAILED at: pytest collected no tests (exit 5)' >&2
    printf ' -- a run that tests nothing is not a pass\n' >&2
    exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"

step=""
printf '\n==> GATE PASSED: ruff check, ruff format --check, mypy, lint-imports, pytest\n'
