#!/usr/bin/env bash
# Main job for a fresh clone: install, then run the demo on the built-in default model.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" ""
python scripts/demo.py "$@"
