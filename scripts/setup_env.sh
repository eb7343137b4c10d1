# Sourced by run_demo.sh and run_tests.sh: create .venv (once) and install the project with the given extras.
# torch is installed first from the pinned CPU release, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".${1:-}"
# the package's native CPU decoding ops, built once per machine (else built in the background at first use)
python -m modeling_rwkv7.kernel_build --native >/dev/null || echo "note: native CPU decoding ops not built; decoding runs the eager model"
