#!/usr/bin/env bash
# First-GPU check (issue 30): about 6 minutes on one H100 (--budget, default 330 s), one report.
#     DINO_REPO=/path/to/dino bench/gpu_check.sh [--dry] [--out DIR] [--budget SECONDS]
#     PYTHON=/path/to/python bench/gpu_check.sh --dino_repo /path/to/dino
# The parts and the report: README (GPUs) and bench/gpu_check.py. Exit status 1 when a part
# failed, 2 on bad arguments; without a usable GPU (or with --dry) every part runs at toy size on
# the CPU (tests/test_gpu_ready.py runs it).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "FAIL: torch does not import with $PY (set PYTHON=/path/to/python)"
    exit 1
fi
exec "$PY" bench/gpu_check.py "$@"
