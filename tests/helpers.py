"""Shared test helpers: running the real command-line scripts in subprocesses, DINO-layout
weight files, and the gate of the checks that need DINO's own code."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.dino_original import DINO_REPO, dino_available, load_dino

REPO = Path(__file__).resolve().parents[1]

# A small SPARO-DINO run on scikit-learn digits (8x8 images upsampled to 16 px crops).
TINY_TRAIN_ARGS = [
    "--arch", "vit_tiny", "--patch_size", "4", "--data_path", "digits", "--subset", "256",
    "--batch_size_per_gpu", "32", "--global_crops_size", "16", "--local_crops_size", "8",
    "--local_crops_number", "2", "--out_dim", "256", "--sparo_slots", "16", "--sparo_dim", "16",
    "--num_workers", "0", "--warmup_epochs", "1", "--print_freq", "4", "--saveckp_freq", "0",
]


def run_script(script, *args, env=None, timeout=600, check=True, gpu=False):
    """Run a repo script with this interpreter; return the CompletedProcess (text output).
    The script sees no GPU (CUDA_VISIBLE_DEVICES=""): the CPU tests' scripts stay on the CPU on
    a GPU host too; gpu=True (for tests marked gpu) leaves the GPUs visible."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if gpu:
        if full_env.get("CUDA_VISIBLE_DEVICES") == "":
            del full_env["CUDA_VISIBLE_DEVICES"]
    else:
        full_env["CUDA_VISIBLE_DEVICES"] = ""
    full_env.update(env or {})
    process = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO,
                             env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and process.returncode != 0:
        raise AssertionError(f"{script} failed ({process.returncode}):\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    return process


def run_two_gloo_ranks(function, *args):
    """function(*args) in two spawned CPU processes joined in a gloo group, as torchrun would
    set them up (RANK, WORLD_SIZE, ...): for tests that patch code inside the ranks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gloo_rank, args=(port, function, args), nprocs=2, start_method="spawn")


def _gloo_rank(rank, port, function, args):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", CUDA_VISIBLE_DEVICES="",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    function(*args)


class Payload:
    """Unpickling this runs `touch MARKER`: the test proves that never happens."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def fashion_mnist_installed():
    """Whether utils finds Fashion-MNIST (the Debian package, or FASHION_MNIST_DIR)."""
    import datasets
    import errors
    try:
        datasets.fashion_mnist_dir()
    except errors.UserError:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_installed(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


# The checks that compare with DINO's own code need a clone named by $DINO_REPO (no default);
# every other DINO-layout check uses this project's readout=cls backbone, whose parameter names
# are DINO's (test_dino_parity.py checks that it computes DINO's features).
needs_dino = pytest.mark.skipif(not dino_available(),
                                reason="DINO_REPO is unset (a clone of facebookresearch/dino runs these)" if DINO_REPO is None else
                                f"DINO_REPO={DINO_REPO} is not a clone of facebookresearch/dino")


def dino_vit_tiny(patch_size: int = 4, img_size: int = 16, seed: int = 0) -> torch.nn.Module:
    """DINO's own vit_tiny (12 blocks, width 192), randomly initialised, in eval mode."""
    torch.manual_seed(seed)
    return load_dino(DINO_REPO).vision_transformer.vit_tiny(patch_size=patch_size, img_size=[img_size]).eval()


def cls_vit_tiny(patch_size: int = 4, img_size: int = 16, seed: int = 0) -> torch.nn.Module:
    """This project's vit_tiny with DINO's CLS read-out, randomly initialised, in eval mode: its
    state dict is laid out like an official DINO backbone file."""
    import vision_transformer as vits

    torch.manual_seed(seed)
    return vits.BackboneConfig(arch="vit_tiny", patch_size=patch_size, img_size=img_size,
                               readout="cls").build().eval()


def save_dino_checkpoint(backbone: torch.nn.Module, path, out_dim: int = 64) -> None:
    """DINO's main_dino.py checkpoint layout around `backbone`: DDP student (its weights + 1),
    plain teacher, DINO heads, optimizer, epoch, args as an argparse.Namespace, the loss centre."""
    import argparse

    import vision_transformer as vits

    state = backbone.state_dict()
    head = vits.DINOHead(state["cls_token"].shape[-1], out_dim).state_dict()
    torch.save(dict(student={**{f"module.backbone.{k}": v + 1 for k, v in state.items()},
                             **{f"module.head.{k}": v for k, v in head.items()}},
                    teacher={**{f"backbone.{k}": v for k, v in state.items()},
                             **{f"head.{k}": v for k, v in head.items()}},
                    optimizer={"state": {}, "param_groups": []}, epoch=100,
                    args=argparse.Namespace(arch="vit_tiny", patch_size=4),
                    dino_loss={"center": torch.zeros(1, out_dim)}), path)
