#!/usr/bin/env bash
# GPU readiness check (issue 23), about 5-8 minutes on one GPU:
#   1. the device, driver, torch build and its CUDA architectures;
#   2. the GPU tests (pytest -m gpu: AMP steps in bf16 and fp16+scaler, 2-rank NCCL training
#      and sharded k-NN when 2 GPUs are visible, FAISS on the GPU when installed);
#   3. one ViT-S/16 SPARO and CLS training step at DINO's recipe (batch 64, 2x224 + 8x96 crops,
#      65536 prototypes, mixed precision) with the allocator's peak memory;
#   4. the k-NN benchmark on the GPU (60k x 10k x 4096, torch and faiss-gpu if installed).
# Exits non-zero when any part fails. Without a usable GPU (or with --dry) it runs in dry
# mode: it prints what it sees and skips every CUDA part (tests/test_gpu_ready.py runs this).
#     bench/gpu_check.sh [--dry]        PYTHON=/path/to/python bench/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-gpu_check_out}
status=0
fail() { echo "FAIL: $*"; status=1; }

echo "== device and build"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader \
        || fail "nvidia-smi"
else
    echo "nvidia-smi: not found"
fi
# One interpreter start: print the build, then exit 0 (a usable GPU), 3 (none: dry mode) or 2
# (GPUs visible but unusable: utils.resolve_use_cuda's one-line error).
"$PY" - "${1:-}" <<'PYEOF'
import sys
import torch
import utils
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, archs {' '.join(torch.cuda.get_arch_list()) or '(none)'}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)} capability {'.'.join(map(str, torch.cuda.get_device_capability(i)))}")
sys.stdout.flush()
try:
    usable = utils.resolve_use_cuda("auto")
except utils.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
sys.exit(0 if usable and sys.argv[1] != "--dry" else 3)
PYEOF
case $? in
    0) ;;
    3) echo "dry mode (--dry, or no usable CUDA GPU): skipped: GPU tests, ViT-S/16 training steps, k-NN benchmark"
       exit $status ;;
    2) fail "GPUs visible but unusable"; exit $status ;;
    *) fail "torch does not import"; exit $status ;;
esac
mkdir -p "$OUT"

echo "== GPU tests"
timeout 300 "$PY" -m pytest -m gpu -q tests/test_gpu.py tests/test_eval_knn.py || fail "GPU tests"

echo "== ViT-S/16 training step, DINO's recipe (batch 64 per GPU)"
timeout 240 "$PY" bench/train_throughput.py --device cuda --arch vit_small --patch_size 16 \
    --global_crops_size 224 --local_crops_size 96 --local_crops_number 8 --out_dim 65536 \
    --batch_size_per_gpu 64 --variants sparo cls --warmup_steps 2 --steps 3 \
    --output_json "$OUT/train_step.json" || fail "training step"

echo "== k-NN benchmark on the GPU"
methods="torch"
"$PY" -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() else 1)" \
    2>/dev/null && methods="torch faiss-gpu"
timeout 180 "$PY" bench/knn_speed.py --device cuda --methods $methods \
    --output_json "$OUT/knn.json" || fail "k-NN benchmark"

[ $status = 0 ] && echo "GPU check passed (results in $OUT/)" || echo "GPU check FAILED"
exit $status
