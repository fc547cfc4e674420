"""GPU/cluster readiness proved on CPU (issue 23): identical teachers across ranks, resume
agreement, the AMP dtype choice, the fp32 prototype layer, --device checks, Slurm/torchrun
set-up, errors from every rank, first-step OOM advice, k-NN memory."""
import argparse
import builtins
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datasets
import devices
import errors
import eval_knn
import knn
import main_dino_sparo
import utils
import vision_transformer as vits
from bench.dino_original import DINO_REPO
from helpers import REPO, TINY_TRAIN_ARGS, needs_dino, run_two_gloo_ranks


@pytest.fixture(autouse=True)
def restore_print():
    """init_distributed_mode replaces builtins.print; put the original back after each test."""
    original = builtins.print
    yield
    builtins.print = original


def training_args(*extra):
    parser = argparse.ArgumentParser(parents=[main_dino_sparo.get_args_parser()])
    return parser.parse_args([*map(str, TINY_TRAIN_ARGS), "--device", "cpu", *map(str, extra)])


# ------------------------------------------------------ 1, 9: set-up across two gloo ranks
def _set_up_rank(output_dirs, results, save_to):
    rank = int(os.environ["RANK"])
    args = training_args("--output_dir", output_dirs[rank])
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed + args.rank)  # each rank draws its own random init
    try:
        models, optimisation, start_epoch, _ = main_dino_sparo.set_up_training(args, Path(output_dirs[rank]))
        torch.save(dict(student=models.student_without_ddp.state_dict(), teacher=models.teacher.state_dict(),
                        start_epoch=start_epoch), Path(results) / f"rank{rank}.pth")
        if save_to and rank == 0:  # a checkpoint at epoch 1 for the resume case
            torch.save(main_dino_sparo.checkpoint_state(models, optimisation, 0, args, [{"epoch": 0}]),
                       Path(save_to) / "checkpoint.pth")
    except errors.UserError as error:
        (Path(results) / f"rank{rank}.err").write_text(str(error))
    finally:
        utils.cleanup_distributed()


def run_two_ranks(output_dirs, results, save_to=None):
    run_two_gloo_ranks(_set_up_rank, [str(d) for d in output_dirs], str(results), save_to and str(save_to))


@pytest.mark.slow
def test_ranks_start_identical_and_agree_on_resume(tmp_path):
    """Item 1: each rank seeds differently, yet after set-up student AND teacher are
    bit-identical on both ranks (the teacher is copied after DDP's broadcast). Item 9: one
    rank finding a checkpoint the other does not is an error on both ranks."""
    shared, saved, empty = (tmp_path / n for n in ("shared", "saved", "empty"))
    for folder in (shared, saved, empty):
        folder.mkdir()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    run_two_ranks([shared, shared], fresh, save_to=saved)
    states = [torch.load(fresh / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    for net in ("student", "teacher"):
        assert states[0][net].keys() == states[1][net].keys()
        for key, value in states[0][net].items():
            assert torch.equal(value, states[1][net][key]), f"{net}.{key} differs across ranks"
    for key, value in states[0]["student"].items():  # and the teacher starts as the student
        assert torch.equal(value, states[0]["teacher"][key]), key

    diverged = tmp_path / "diverged"
    diverged.mkdir()
    run_two_ranks([empty, saved], diverged)  # a node-local --output_dir: only rank 1 has it
    for rank in (0, 1):
        error = diverged / f"rank{rank}.err"
        assert error.exists(), f"rank {rank} did not stop"
        assert "different checkpoints" in error.read_text() and "epochs 0 to 1" in error.read_text()


# ------------------------------------------------------------------ 2: the AMP dtype
@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_only_from_compute_capability_8(monkeypatch, capability, dtype):
    # torch calls bf16 "supported" on V100/T4 (emulated): that must not decide
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # else GradScaler disables itself
    args = argparse.Namespace(device=torch.device("cuda", 0), use_fp16=True, cpu_bf16=False)
    _, scaler = main_dino_sparo.autocast_context(args)
    assert scaler.is_enabled() == (dtype == torch.float16)  # loss scaling with fp16 only
    assert devices.autocast_dtype(args.device, use_fp16=True) == dtype
    seen = {}
    monkeypatch.setattr(torch, "autocast", lambda device, dtype: seen.update(dtype=dtype))
    devices.autocast(args.device, True)  # the evaluation scripts' choice
    assert seen["dtype"] == dtype


def test_fp16_scaled_step_trains_and_skips_overflow():
    """TrainStep's GradScaler path (DINO's fp16 recipe), on CPU fp16 autocast: a normal step
    changes the student; a step whose scaled gradients overflow is skipped and lowers the scale."""
    torch.manual_seed(0)
    args = training_args("--clip_grad", "3.0", "--freeze_last_layer", "0")
    args.device, args.distributed = torch.device("cpu"), False
    models, optimisation = main_dino_sparo.build_training(args)
    student, scaler = models.student, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    step = main_dino_sparo.TrainStep(models, optimisation._replace(
        autocast=lambda: torch.autocast("cpu", dtype=torch.float16), fp16_scaler=scaler), args)
    crops = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
    before = student.backbone.patch_embed.proj.weight.detach().clone()
    loss = step(crops, 0, 1e-3, 0.04, 0.996).loss
    assert torch.isfinite(loss)
    assert not torch.equal(before, student.backbone.patch_embed.proj.weight)
    scaler.update(2.0 ** 100)  # scaled fp16-range gradients now overflow
    before = student.backbone.patch_embed.proj.weight.detach().clone()
    step(crops, 0, 1e-3, 0.04, 0.996)
    assert torch.equal(before, student.backbone.patch_embed.proj.weight)  # step skipped
    assert scaler.get_scale() < 2.0 ** 100


# --------------------------------------------------------- 3: fp32 prototype logits
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prototype_logits_are_fp32_under_autocast(dtype):
    torch.manual_seed(0)
    head = vits.DINOHead(64, 512, hidden_dim=128, bottleneck_dim=32)
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=dtype):
        logits = head(x)
        bottleneck = torch.nn.functional.normalize(head.mlp(x).float(), dim=-1)
    assert logits.dtype == torch.float32
    v, g = head.last_layer.weight_v.double(), head.last_layer.weight_g.double()
    reference = bottleneck.double() @ (g * v / v.norm(dim=1, keepdim=True)).T  # independent
    # fp32 error ~1e-7; a bf16 GEMM output would be off by ~4e-3 at |cos| ~ 1
    torch.testing.assert_close(logits.double(), reference, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ 4: --device
def test_arch_support_rules():
    build = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130
    assert devices.arch_supported((8, 9), build)  # L4/L40S run the sm_86 cubins
    assert devices.arch_supported((9, 0), build) and devices.arch_supported((12, 1), build)
    assert not devices.arch_supported((7, 0), build)  # V100
    assert not devices.arch_supported((6, 0), build)
    assert devices.arch_supported((7, 0), ["sm_80", "compute_70"])  # PTX JIT-compiles upwards
    assert not devices.arch_supported((9, 1), ["sm_90a"])  # arch-specific: its own GPU only


def test_visible_gpus_without_cuda_are_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_nvidia_smi_gpus", lambda: "Tesla V100-SXM2-32GB (capability 7.0, driver 535.1) x8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(errors.UserError, match=r"CUDA_VISIBLE_DEVICES=0,1.*V100.*capability 7.0.*CUDA 13"):
        devices.resolve_use_cuda("auto")
    assert devices.resolve_use_cuda("cpu") is False
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose: CPU is right
    assert devices.resolve_use_cuda("auto") is False
    with pytest.raises(errors.UserError, match="--device cuda"):
        devices.resolve_use_cuda("cuda")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")  # the launcher asked for GPUs
    with pytest.raises(errors.UserError, match="SLURM_GPUS_ON_NODE=8"):
        devices.resolve_use_cuda("auto")


def test_gpu_missing_from_the_build_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    with pytest.raises(errors.UserError, match=r"V100.*capability 7\.0.*not supported by torch .*CUDA"):
        devices.resolve_use_cuda("auto")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    assert devices.resolve_use_cuda("auto") is True


# ------------------------------------------------------------ 5: every rank's errors
def test_errors_and_warnings_come_from_every_rank(capsys):
    utils.setup_for_distributed(False, rank=3)
    print("progress line")  # progress: rank 0 only
    print("error: cannot read image x.jpg", file=sys.stderr)
    datasets.SkipUnreadableImages([])._warn(7, OSError("truncated"))  # a data warning
    out, err = capsys.readouterr()
    assert out == ""
    assert "[rank 3] error: cannot read image x.jpg" in err
    assert "[rank 3] Warning: skipping unreadable image #7" in err


# ------------------------------------------------------------- 8: process set-up
class FakeDist:
    """Records init_process_group instead of joining a group."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(utils.dist, "init_process_group", lambda **kw: self.calls.append(kw))
        monkeypatch.setattr(utils.dist, "barrier", lambda *a, **k: None)


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "MASTER_")) or name in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
            monkeypatch.delenv(name)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # restored (removed) after the test
    return monkeypatch


def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: None)


def test_sbatch_script_without_srun_is_one_process(clean_env):
    """sbatch sets SLURM_NTASKS and SLURM_PROCID in the batch script itself: a plain python
    call there is one process, not rank 0 of 8 waiting 30 min for the others."""
    calls = FakeDist(clean_env).calls
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_JOB_ID", "1234")
    args = argparse.Namespace(device="cpu")
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.distributed, calls) == (0, 1, False, [])


def test_srun_step_joins_its_group(clean_env):
    calls = FakeDist(clean_env).calls
    for name, value in dict(SLURM_NTASKS="16", SLURM_PROCID="5", SLURM_STEP_NUM_TASKS="8",
                            SLURM_STEP_ID="0", SLURM_LOCALID="1", SLURM_NODEID="1",
                            SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_STEP_NUM_NODES="2",
                            SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="gpu7,gpu8").items():
        clean_env.setenv(name, value)
    clean_env.setattr(subprocess, "run", _no_scontrol)
    args = argparse.Namespace(device="cpu")
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size) == (5, 8)
    assert calls[0]["backend"] == "gloo" and os.environ["MASTER_ADDR"] == "gpu7"


def _no_scontrol(*args, **kwargs):
    raise FileNotFoundError("scontrol")


def test_multi_node_list_without_scontrol_is_an_error(clean_env):
    FakeDist(clean_env)
    for name, value in dict(SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="16", SLURM_STEP_NUM_NODES="2",
                            SLURM_JOB_NODELIST="gpu[07-08]").items():
        clean_env.setenv(name, value)
    clean_env.setattr(subprocess, "run", _no_scontrol)
    with pytest.raises(errors.UserError, match=r"gpu\[07-08\].*MASTER_ADDR"):
        utils.init_distributed_mode(argparse.Namespace(device="cpu"))


def test_nccl_gets_its_device_and_two_ranks_never_share_a_gpu(clean_env):
    calls = FakeDist(clean_env).calls
    fake_gpus(clean_env, 4)
    for name, value in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="3", LOCAL_WORLD_SIZE="4").items():
        clean_env.setenv(name, value)
    args = argparse.Namespace(device="auto")
    utils.init_distributed_mode(args)
    assert args.device == torch.device("cuda", 3) and args.gpu == 3
    assert calls[0]["backend"] == "nccl" and calls[0]["device_id"] == torch.device("cuda", 3)

    clean_env.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on a node with 4 GPUs: on every rank
    with pytest.raises(errors.UserError, match=r"8 processes on this node but only 4 visible GPU\(s\)"):
        utils.init_distributed_mode(argparse.Namespace(device="auto"))
    fake_gpus(clean_env, 1)  # torchrun --nproc_per_node 2 on a 1-GPU host (the old gloo tests)
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        clean_env.setenv(name, value)
    with pytest.raises(errors.UserError, match="two ranks would share a GPU"):
        utils.init_distributed_mode(argparse.Namespace(device="auto"))


def test_srun_task_bound_to_its_own_gpu(clean_env):
    """srun --gpus-per-task: every task sees one GPU (its own) whatever its local id."""
    FakeDist(clean_env)
    fake_gpus(clean_env, 1)
    for name, value in dict(SLURM_PROCID="3", SLURM_STEP_NUM_TASKS="4", SLURM_LOCALID="3",
                            SLURM_STEP_TASKS_PER_NODE="4", SLURM_STEP_NUM_NODES="1",
                            SLURM_JOB_ID="77").items():
        clean_env.setenv(name, value)
    clean_env.setattr(subprocess, "run", _no_scontrol)
    args = argparse.Namespace(device="auto")
    utils.init_distributed_mode(args)
    assert args.gpu == 0 and args.world_size == 4


# ------------------------------------------------------------ 11: first-step OOM
def test_first_step_cuda_oom_is_one_line_with_a_batch_that_fits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 30 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a: argparse.Namespace(total_memory=32 * 2**30))
    args = argparse.Namespace(device=torch.device("cuda", 0), batch_size_per_gpu=64)
    with pytest.raises(errors.UserError) as caught:
        with main_dino_sparo.explain_out_of_memory(args, first_step=True):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 ...")
    message = str(caught.value)
    assert "\n" not in message and "30.0 GiB peak" in message
    # 64 images needed (30 + 4 - 2) GiB of activations: 0.5 GiB each; 0.9 * 32 - 2 = 26.8 GiB
    assert "--batch_size_per_gpu 53 or less" in message
    with pytest.raises(torch.OutOfMemoryError):  # later steps keep their traceback
        with main_dino_sparo.explain_out_of_memory(args, first_step=False):
            raise torch.OutOfMemoryError("CUDA out of memory.")


# --------------------------------------------------------------- 7: k-NN memory
def test_auto_search_of_a_cuda_bank_makes_no_faiss_copy(monkeypatch):
    class GpuFaiss:
        StandardGpuResources = object
        get_num_gpus = staticmethod(lambda: 1)
    monkeypatch.setattr(knn, "_import_faiss", lambda: GpuFaiss)
    # FAISS GPU would copy a bank that already lies on the GPU into its own storage
    assert knn.resolve_backend("auto", torch.device("cuda", 0)) == "torch"
    assert knn.resolve_backend("faiss-gpu", torch.device("cuda", 0)) == "faiss-gpu"


def test_splitting_the_bank_frees_the_rest():
    bank, labels = torch.randn(1000, 8), torch.arange(1000)
    shard, shard_labels = eval_knn.bank_shard(bank, labels, rank=1, world=4)
    assert torch.equal(shard, bank[1::4]) and torch.equal(shard_labels, labels[1::4])
    # a strided view would keep all 1000 rows alive on every GPU
    assert shard.untyped_storage().nbytes() == 250 * 8 * 4


def test_loaded_features_are_memory_mapped_and_sliced_first(tmp_path, monkeypatch):
    bank = torch.nn.functional.normalize(torch.randn(100, 8), dim=1).half()
    test = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    for name, tensor in zip(eval_knn.FEATURE_FILES, (bank, test, torch.arange(100), torch.arange(10))):
        torch.save(tensor, tmp_path / name)
    mapped = []
    original_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: mapped.append(k.get("mmap")) or original_load(*a, **k))
    args = argparse.Namespace(load_features=str(tmp_path), device=torch.device("cpu"),
                              use_cuda=False, knn_fp16=False)
    tensors, _ = eval_knn.load_features(args, shard=(2, 3))
    assert mapped == [True] * 4
    torch.testing.assert_close(tensors["train"], bank[2::3].float(), atol=1e-3, rtol=0)
    assert torch.equal(tensors["train_labels"], torch.arange(100)[2::3])
    assert tensors["test"].shape == (10, 8)  # every rank keeps all test features


# --------------------------------------------------------------- 10: TF32 settings
def test_tf32_for_training_and_probe_but_never_for_knn(monkeypatch):
    flags = dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32,
                 bench=torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        devices.enable_fast_fp32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32  # nothing changes on CPU
        devices.enable_fast_fp32(torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flags["matmul"]
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags["cudnn"], flags["bench"]
    for script in ("main_dino_sparo.py", "eval_linear.py"):
        assert "devices.enable_fast_fp32(args.device)" in (REPO / script).read_text()
    assert "enable_fast_fp32" not in (REPO / "eval_knn.py").read_text()  # exact fp32 similarities


# ------------------------------------------------------------ bench/gpu_check.sh
def run_gpu_check(out, *args, **env):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), *args, "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


GPU_CHECK_PARTS = ["gpu_tests", "train_step", "device_stage", "loader", "end_to_end", "amp_parity",
                   "knn_fp32", "knn_fp16", "compile"]


@needs_dino
def test_gpu_check_dry_mode_runs_every_part_and_reports_what_it_measured(tmp_path):
    """bench/gpu_check.sh --dry: every part at toy size on the CPU, one report whose lines name
    each part with the figures this run measured (read back from the parts' own results)."""
    process = run_gpu_check(tmp_path, "--dry", DINO_REPO=str(DINO_REPO))
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    markdown = (tmp_path / "report.md").read_text()
    assert report["mode"].startswith("dry") and report["passed"]
    versions = report["versions"]
    assert versions["torch"] == torch.__version__ and versions["arch_list"] == torch.cuda.get_arch_list()
    assert versions["python"] == platform.python_version() and versions["timm"] and versions["gpus"] == []
    parts = {part["name"]: part for part in report["parts"]}
    assert list(parts) == GPU_CHECK_PARTS
    assert parts["gpu_tests"]["status"] == "skipped" and parts["gpu_tests"]["figures"]["skipped"] > 0  # no GPU
    assert parts["amp_parity"]["status"] in ("passed", "skipped")  # a CPU part, a GPU-only test or none yet
    for name in ("train_step", "device_stage", "loader", "end_to_end", "knn_fp32", "knn_fp16", "compile"):
        assert parts[name]["status"] == "measured", parts[name]
    steps = parts["train_step"]["figures"]["results"]
    assert set(steps) == {"sparo", "cls", "dino"} and all(step["images_per_s"] > 0 for step in steps.values())
    assert parts["train_step"]["figures"]["device_stage_in_steps"] is True
    assert parts["device_stage"]["figures"]["ms_per_step"] > 0
    loaders = parts["loader"]["figures"]["results"]
    assert set(loaders) == {"cpu_1w", "device_1w", "cpu_2w", "device_2w"}
    assert all(loader["images_per_s"] > 0 for loader in loaders.values())
    epochs = parts["end_to_end"]["figures"]["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(0 <= e["knn_top1"] <= 100 for e in epochs)
    for name in ("knn_fp32", "knn_fp16"):
        assert parts[name]["figures"]["seconds"] > 0 and parts[name]["figures"]["same_predictions"]
    # one line per part, naming it, with this run's figures
    lines = markdown.splitlines()
    for needle in ("original DINO", "loader throughput", "AMP parity", "k-NN", "end to end", "device stage",
                   "pytest -m gpu", "--compile", "versions"):
        assert sum(needle in line for line in lines) >= 1, needle
    assert f"original DINO {steps['dino']['images_per_s']:.1f} img/s" in markdown
    assert f"{parts['knn_fp16']['figures']['seconds']:.2f} s" in markdown
    assert f"k-NN top-1 {epochs[1]['knn_top1']:.2f}" in markdown


def test_gpu_check_reports_a_failed_or_skipped_part_without_figures(tmp_path):
    """A part whose run fails (here: DINO code that does not import) or that the budget leaves
    out is reported as such, with its reason and no figure; the check then fails."""
    from bench import gpu_check

    broken = tmp_path / "dino"
    broken.mkdir()
    for name in ("utils", "vision_transformer"):
        (broken / f"{name}.py").write_text("")
    (broken / "main_dino.py").write_text("raise ImportError('this DINO copy is broken')\n")
    args = gpu_check.get_args_parser().parse_args(["--dry", "--out", str(tmp_path / "out"), "--budget", "60"])
    check = gpu_check.Check(args, dry=True)
    gpu_check.train_step_parts(check, str(broken))
    check.budget = 0  # nothing left: the next part is skipped
    gpu_check.knn_part(check, "fp32")
    report = check.write(gpu_check.versions(str(broken)))
    step, stage, knn = report["parts"]
    assert step["status"] == "failed" and "this DINO copy is broken" in step["reason"] and step["figures"] == {}
    assert stage["status"] == "failed" and stage["figures"] == {}
    assert knn["status"] == "skipped" and "budget" in knn["reason"] and knn["figures"] == {}
    assert not report["passed"]
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert any(line.startswith("- **training step vs the original DINO step**: FAILED: exit status")
               and "img/s" not in line for line in lines)
    assert any(line.startswith("- **k-NN at ImageNet shape, fp32**: SKIPPED: 0 s of the 0-s budget left")
               for line in lines)


def test_gpu_check_needs_the_dino_code_and_a_usable_gpu(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "DINO_REPO"}
    process = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), "--dry", "--out", str(tmp_path)], cwd=REPO,
                             env={**env, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""},
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 2 and process.stderr.count("\n") == 1
    assert process.stderr.startswith("error: the check times the original DINO step and needs its code")
    # A machine without NVIDIA device files: a GPU named in CUDA_VISIBLE_DEVICES cannot be used there
    # (this process never sees a GPU: conftest hides them from CPU tests, so device_count() is 0 on a
    # GPU machine too).
    if devices.gpus_expected({}) is None:
        process = run_gpu_check(tmp_path, "--dry", CUDA_VISIBLE_DEVICES="0")  # a GPU that CUDA cannot use
        assert process.returncode == 1 and "FAIL: GPUs visible but unusable" in process.stdout
        assert "error: GPUs are expected (CUDA_VISIBLE_DEVICES=0)" in process.stderr


# --------------------------------------------------------- 6: CPU tests stay on the CPU
def test_cpu_tests_never_see_a_gpu(monkeypatch):
    """conftest hides GPUs from every test not marked gpu (in this process and in the scripts
    it starts): on a GPU host the gloo torchrun tests would otherwise put 2 NCCL ranks on one
    GPU, and the bit-exact resume test would meet non-deterministic kernels."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not torch.cuda.is_available()
    seen = {}
    monkeypatch.setattr(subprocess, "run", lambda *a, env=None, **k: seen.update(env=env) or
                        subprocess.CompletedProcess(a, 0, "", ""))
    import helpers
    helpers.run_script("main_dino_sparo.py")
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == ""
    # the scripts of tests marked gpu see the GPUs (the hiding "" is dropped, not passed on)
    helpers.run_script("main_dino_sparo.py", gpu=True)
    assert "CUDA_VISIBLE_DEVICES" not in seen["env"]


# ------------------------------------------------- leaving the group frees gloo's threads
LEAVE_GROUP_SCRIPT = """
import os, sys
import devices
import errors
import utils
import torch.distributed as dist
def threads(): return len(os.listdir("/proc/self/task"))
before = threads()
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
import timm, vision_transformer  # timm imports torch.distributed.nn after the group exists
during = threads()
utils.cleanup_distributed()
print(before, during, threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_leaving_the_group_ends_its_worker_threads(tmp_path):
    """A group that outlives destroy_process_group() keeps gloo's worker threads into interpreter
    exit, where one can abort the process (1 in 3 two-process embed.py runs did before utils
    imported torch.distributed.nn ahead of the group). Counted in a fresh interpreter."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_GROUP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "rendezvous")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    before, during, after = map(int, result.stdout.split()[-3:])
    assert during > before  # the group's threads existed ...
    assert after == before  # ... and ended with it
