"""Real GPU tests (marker gpu; skipped without CUDA): AMP training steps in bf16 and in fp16
with loss scaling, 2-rank NCCL training and sharded k-NN, FAISS on the GPU.
Run them alone with: pytest -m gpu (bench/gpu_check.sh does)."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

import devices
import knn
import main_dino_sparo
from helpers import REPO, TINY_TRAIN_ARGS, read_log

pytestmark = pytest.mark.gpu

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def gpu_env():
    """The environment for GPU subprocesses (without a CUDA_VISIBLE_DEVICES that hides GPUs)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    if env.get("CUDA_VISIBLE_DEVICES") == "":
        del env["CUDA_VISIBLE_DEVICES"]
    return env


def amp_train_step(dtype, steps=3):
    """A few TrainSteps of a small ViT on cuda:0 under autocast(dtype); returns
    (losses, scaler, how much the student moved)."""
    torch.manual_seed(0)
    parser = argparse.ArgumentParser(parents=[main_dino_sparo.get_args_parser()])
    args = parser.parse_args([*TINY_TRAIN_ARGS, "--freeze_last_layer", "0"])
    args.device, args.distributed = torch.device("cuda", 0), False
    models, optimisation = main_dino_sparo.build_training(args)
    student, scaler = models.student, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    step = main_dino_sparo.TrainStep(models, optimisation._replace(
        autocast=lambda: torch.autocast("cuda", dtype=dtype), fp16_scaler=scaler), args)
    crops = [torch.randn(8, 3, 16, 16, device="cuda")] * 2 + [torch.randn(8, 3, 8, 8, device="cuda")] * 2
    before = student.backbone.patch_embed.proj.weight.detach().clone()
    losses = [float(step(crops, 0, 1e-4, 0.04, 0.996).loss) for _ in range(steps)]
    moved = float((student.backbone.patch_embed.proj.weight - before).abs().max())
    with torch.autocast("cuda", dtype=dtype):
        logits = student(crops[:1])
    assert logits.dtype == torch.float32  # the prototype layer stays fp32 on the GPU too
    return losses, scaler, moved


def test_amp_choice_matches_this_gpu():
    expected = torch.bfloat16 if torch.cuda.get_device_capability(0)[0] >= 8 else torch.float16
    assert devices.autocast_dtype(torch.device("cuda", 0), use_fp16=True) == expected
    args = argparse.Namespace(device=torch.device("cuda", 0), use_fp16=True, cpu_bf16=False)
    _, scaler = main_dino_sparo.autocast_context(args)
    assert scaler.is_enabled() == (expected == torch.float16)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] < 8,
                    reason="bf16 is emulated before compute capability 8.0")
def test_bf16_amp_step():
    losses, _, moved = amp_train_step(torch.bfloat16)
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and moved > 0


def test_fp16_amp_step_with_loss_scaling():
    losses, scaler, moved = amp_train_step(torch.float16)
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and moved > 0
    assert scaler.is_enabled() and scaler.get_scale() > 0


@needs_two_gpus
def test_two_rank_nccl_training(tmp_path):
    out = tmp_path / "nccl"
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(REPO / "main_dino_sparo.py"), *TINY_TRAIN_ARGS, "--batch_size_per_gpu", "16",
         "--epochs", "1", "--device", "cuda", "--output_dir", str(out)],
        cwd=REPO, env=gpu_env(), capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-2000:]
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["args"]["world_size"] == 2 and checkpoint["args"]["device"].startswith("cuda")
    assert len(read_log(out / "log.txt")) == 1


@needs_two_gpus
def test_two_rank_sharded_knn_equals_one_gpu(tiny_sparo_checkpoint, tmp_path):
    common = ["eval_knn.py", "--pretrained_weights", str(tiny_sparo_checkpoint), "--data_path",
              "digits", "--nb_knn", "5", "20", "--device", "cuda"]
    runs = []
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run",
                                        "--nproc_per_node=2", "--standalone"]):
        process = subprocess.run([*launcher, *common, "--output_json", str(tmp_path / f"{len(runs)}.json")],
                                 cwd=REPO, env=gpu_env(), capture_output=True, text=True, timeout=600)
        assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-2000:]
        runs.append([line for line in process.stdout.splitlines() if "NN classifier result" in line])
    assert runs[0] == runs[1] and len(runs[0]) == 2


def test_faiss_gpu_equals_torch_on_the_gpu():
    faiss = knn._import_faiss()
    if faiss is None or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss with GPU support is not installed")
    generator = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(5000, 64, generator=generator), dim=1).cuda()
    queries = torch.nn.functional.normalize(torch.randn(300, 64, generator=generator), dim=1).cuda()
    sims_faiss, index_faiss = knn.search_topk(bank, queries, 20, "faiss-gpu")
    sims_torch, index_torch = knn.search_topk(bank, queries, 20, "torch")
    torch.testing.assert_close(sims_faiss.cpu(), sims_torch.cpu(), atol=1e-5, rtol=0)
    assert (index_faiss.cpu() == index_torch.cpu()).float().mean() > 0.99  # ties may swap
