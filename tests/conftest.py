import pytest
import torch

from helpers import REPO, TINY_TRAIN_ARGS, run_script


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Tests not marked gpu run on the CPU even on a GPU host: scripts started in a subprocess
    (torchrun's gloo tests included) see no GPU, and in-process code finds no CUDA, so a CPU
    test never puts two NCCL ranks on one GPU or meets non-deterministic GPU kernels."""
    if "gpu" in request.keywords:
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def tiny_sparo_checkpoint(tmp_path_factory):
    """One real SPARO-DINO epoch on digits; returns the checkpoint path (shared by tests; the
    run's output is kept beside it in stdout.txt)."""
    out = tmp_path_factory.mktemp("tiny_sparo")
    process = run_script("main_dino_sparo.py", *TINY_TRAIN_ARGS, "--epochs", "1", "--output_dir", out)
    (out / "stdout.txt").write_text(process.stdout)
    return out / "checkpoint.pth"


@pytest.fixture(scope="session", params=["gap", "cls_proj"])
def tiny_control_checkpoint(request, tmp_path_factory):
    """One real DINO epoch of each control read-out of issue 19 on 64 digits (two steps: the
    point is the checkpoint's layout, not its quality); returns the checkpoint path."""
    out = tmp_path_factory.mktemp(f"tiny_{request.param}")
    process = run_script("main_dino_sparo.py", *TINY_TRAIN_ARGS, "--subset", "64", "--epochs", "1",
                         "--readout", request.param, "--output_dir", out)
    (out / "stdout.txt").write_text(process.stdout)
    return out / "checkpoint.pth"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
