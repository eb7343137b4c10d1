#!/usr/bin/env bash
# Test job for a fresh clone: install with the test extras, then run the whole suite.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" "[test]"
python -m pytest -q --durations=25 "$@"  # the 25 slowest tests, for keeping CI within its time
