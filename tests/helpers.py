"""Shared test helpers: running the real command-line scripts in subprocesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A small SPARO-DINO run on scikit-learn digits (8x8 images upsampled to 16 px crops).
TINY_TRAIN_ARGS = [
    "--arch", "vit_tiny", "--patch_size", "4", "--data_path", "digits", "--subset", "256",
    "--batch_size_per_gpu", "32", "--global_crops_size", "16", "--local_crops_size", "8",
    "--local_crops_number", "2", "--out_dim", "256", "--sparo_slots", "16", "--sparo_dim", "16",
    "--num_workers", "0", "--warmup_epochs", "1", "--print_freq", "4", "--saveckp_freq", "0",
]


def run_script(script, *args, env=None, timeout=600, check=True):
    """Run a repo script with this interpreter; return the CompletedProcess (text output)."""
    # CUDA_VISIBLE_DEVICES="": the CPU tests' scripts stay on the CPU on a GPU host too
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    full_env.update(env or {})
    process = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO,
                             env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and process.returncode != 0:
        raise AssertionError(f"{script} failed ({process.returncode}):\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    return process


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def fashion_mnist_installed():
    """Whether utils finds Fashion-MNIST (the Debian package, or FASHION_MNIST_DIR)."""
    import utils
    try:
        utils.fashion_mnist_dir()
    except utils.UserError:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_installed(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
