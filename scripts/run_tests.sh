#!/usr/bin/env bash
# Test job for a fresh clone: install with the test extras, then run the whole suite.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" "[test]"
# Two pytest-xdist workers, each test file whole on one of them (its module fixtures made once); their OpenMP threads
# sleep while they wait instead of spinning, since the two workers share the cores. The 25 slowest tests are listed,
# for keeping CI within its time.
OMP_WAIT_POLICY=PASSIVE python -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
