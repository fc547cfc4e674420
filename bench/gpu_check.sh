#!/usr/bin/env bash
# First-GPU check (issue 30): about 6 minutes on one H100 (--budget, default 330 s), one report.
#     DINO_REPO=/path/to/dino bench/gpu_check.sh [--dry] [--out DIR] [--budget SECONDS]
#     PYTHON=/path/to/python bench/gpu_check.sh --dino_repo /path/to/dino
# Versions and architectures; pytest -m gpu; the ViT-S/16 training step at DINO's recipe against
# the original DINO step (DINO's own code, --dino_repo or DINO_REPO); the device stage's cost;
# loader throughput over 1,000 JPEGs; one epoch end to end with the k-NN monitor and a resume;
# AMP parity; k-NN at ImageNet's shape in fp32 and fp16; --compile if time is left. The report
# (DIR/report.md and report.json, default gpu_check_out/) names every part with its figures, or
# FAILED / SKIPPED and why. Exit status 1 when a part failed, 2 on bad arguments. Without a usable
# GPU (or with --dry) every part runs at toy size on the CPU (tests/test_gpu_ready.py runs it).
# Details: bench/gpu_check.py.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "FAIL: torch does not import with $PY (set PYTHON=/path/to/python)"
    exit 1
fi
exec "$PY" bench/gpu_check.py "$@"
