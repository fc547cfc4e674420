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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
