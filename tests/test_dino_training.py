"""DINO recipe pieces against independent computations, and real training runs on digits."""
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config_files
import datasets
import devices
import errors
import main_dino_sparo as dino
import utils
import vision_transformer as vits
from bench.dino_reference import pairwise_dino_loss  # DINO's pair-by-pair formulation
from bench.host_syncs import HostSyncRecorder
from helpers import REPO, TINY_TRAIN_ARGS, read_log, run_script


@pytest.mark.parametrize("ncrops", [2, 4, 10])
def test_dino_loss_matches_pairwise_reference_and_updates_center(ncrops):
    torch.manual_seed(0)
    batch, out_dim = 6, 32
    loss_fn = dino.DINOLoss(out_dim, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                            warmup_teacher_temp_epochs=5, nepochs=10)
    loss_fn.center.normal_()
    center_before = loss_fn.center.clone()
    student = torch.randn(ncrops * batch, out_dim)
    teacher = torch.randn(2 * batch, out_dim)
    epoch = 2
    temp = 0.04 + (0.07 - 0.04) * epoch / 4  # linear warm-up over 5 epochs
    expected = pairwise_dino_loss(student, teacher, center_before, ncrops, 0.1, temp)
    torch.testing.assert_close(loss_fn(student, teacher, epoch)[0], expected)
    torch.testing.assert_close(loss_fn.center, 0.9 * center_before + 0.1 * teacher.mean(0, keepdim=True))


def test_teacher_temperature_schedule():
    loss_fn = dino.DINOLoss(8, 4, 0.04, 0.07, warmup_teacher_temp_epochs=30, nepochs=100)
    schedule = loss_fn.teacher_temp_schedule
    assert len(schedule) == 100 and schedule[0] == pytest.approx(0.04)
    assert schedule[29] == pytest.approx(0.07) and schedule[-1] == pytest.approx(0.07)


@pytest.mark.parametrize("end", [None, 0.99])
def test_teacher_momentum_schedule_ends_at_momentum_teacher_end(end):
    flags = ["--momentum_teacher", "0.99"] + ([] if end is None else ["--momentum_teacher_end", str(end)])
    args = dino.get_args_parser().parse_args(flags + ["--epochs", "3", "--warmup_epochs", "1"])
    args.world_size = 1
    momentum = dino.build_schedules(args, iters_per_epoch=5)["momentum"]
    assert len(momentum) == 15 and momentum[0] == pytest.approx(0.99)
    # DINO's cosine to 1 unless told otherwise; a constant schedule when start == end
    assert momentum[-1] == pytest.approx(1.0 if end is None else end, abs=1e-3)
    assert np.all(np.diff(momentum) >= 0) if end is None else np.allclose(momentum, 0.99)


@pytest.mark.parametrize("warmup", [0, 2, 10])
def test_cosine_schedule_length_and_end_points(warmup):
    schedule = utils.cosine_scheduler(1.0, 0.1, epochs=10, niter_per_ep=7, warmup_epochs=warmup,
                                      start_warmup_value=0.0)
    assert len(schedule) == 70
    # a warm-up as long as the run ends at the peak (DINO itself fails there)
    assert schedule[-1] == pytest.approx(0.1 if warmup < 10 else 1.0, abs=1e-3)
    if warmup:
        assert schedule[0] == 0.0
        assert np.all(np.diff(schedule[: warmup * 7]) > 0)
    if warmup < 10:
        assert schedule[warmup * 7] == pytest.approx(1.0)
        assert np.all(np.diff(schedule[warmup * 7:]) <= 0)


def test_per_parameter_gradient_clipping():
    """utils.clip_gradients (all factors as one vector) against DINO's loop, parameter by
    parameter: norm, clip / (norm + 1e-6), multiply where that is below 1."""
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=4, img_size=16, sparo_slots=4, sparo_dim=4)
    model(torch.randn(3, 3, 16, 16)).square().sum().backward()
    params = list(model.parameters())
    params[1].grad = None  # parameters without a gradient are left alone
    for i, p in enumerate(params):  # norms from far below to far above the cap
        if p.grad is not None:
            p.grad.mul_(10.0 ** (i % 7 - 3) / (p.grad.norm() + 1e-12))
    expected = []
    for p in params:
        grad = None if p.grad is None else p.grad.clone()
        if grad is not None:
            clip_coef = 3.0 / (grad.norm(2) + 1e-6)
            if clip_coef < 1:
                grad.mul_(clip_coef)
        expected.append(grad)
    assert sum(e is not None and e.norm() < 2.999 for e in expected) > 10  # both sides of the cap
    assert sum(e is not None and abs(e.norm() - 3) < 1e-4 for e in expected) > 10
    with HostSyncRecorder() as recorder:
        utils.clip_gradients(model, 3.0)
    for p, grad in zip(params, expected):
        if grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, grad, rtol=1e-6, atol=0)
    # a few ops in all, not a few per parameter (DINO: about 4 x 150 here), and no host sync
    assert recorder.total_ops < 12 < len(params) and recorder.syncs == []


def test_no_weight_decay_on_biases_and_norms():
    model = vits.vit_tiny(patch_size=4, img_size=16, sparo_slots=4, sparo_dim=4)
    decayed, not_decayed = utils.get_params_groups(model)
    assert not_decayed["weight_decay"] == 0.0
    ids = {id(p) for p in not_decayed["params"]}
    assert id(model.norm.weight) in ids and id(model.sparo.key.bias) in ids
    assert id(model.sparo.queries) in {id(p) for p in decayed["params"]}


def tiny_args(extra=()):
    parser = dino.get_args_parser()
    args = parser.parse_args([*TINY_TRAIN_ARGS, "--epochs", "2", *extra])
    args.rank, args.world_size, args.gpu, args.device, args.distributed = 0, 1, None, torch.device("cpu"), False
    return args


def test_train_step_updates_teacher_by_ema_and_freezes_last_layer():
    torch.manual_seed(0)
    args = tiny_args(["--freeze_last_layer", "1"])
    models, optimisation = dino.build_training(args)  # DINOLoss(out_dim, 4 crops, 0.04, 0.04, 0, 2), AdamW
    student, teacher = models.student, models.teacher
    step = dino.TrainStep(models, optimisation, args)
    images = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    last_layer_before = student.head.last_layer.weight_v.clone()
    loss = step(images, epoch=0, lr=1e-3, wd=0.04, momentum=0.9).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(student.head.last_layer.weight_v, last_layer_before)  # frozen in epoch 0
    student_after = student.state_dict()
    for name, before in teacher_before.items():
        if before.is_floating_point() and "sparo" in name or name.startswith("backbone.blocks.0."):
            expected = 0.9 * before + 0.1 * student_after[name]
            torch.testing.assert_close(teacher.state_dict()[name], expected)
    moved = student_after["backbone.sparo.queries"] - teacher_before["backbone.sparo.queries"]
    assert moved.abs().max() > 0


def test_slot_query_lr_multiplier_scales_only_the_queries_first_adamw_step():
    """--sparo_query_lr_mult: AdamW's first step moves each coordinate by about lr (g / |g|),
    so with the multiplier the queries move that many times further and every other weight
    exactly as without it; the default keeps DINO's two groups (checkpoint layout)."""
    moved = {}
    for mult in (1.0, 10.0):
        torch.manual_seed(0)
        args = tiny_args(["--sparo_query_lr_mult", str(mult), "--freeze_last_layer", "0"])
        models, optimisation = dino.build_training(args)
        assert len(optimisation.optimizer.param_groups) == (2 if mult == 1 else 3)
        before = {k: v.clone() for k, v in models.student.state_dict().items()}
        torch.manual_seed(1)
        images = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
        dino.TrainStep(models, optimisation, args)(images, epoch=0, lr=1e-3, wd=0.04, momentum=0.9)
        moved[mult] = {k: (v - before[k]).abs() for k, v in models.student.state_dict().items()
                       if v.is_floating_point()}
    queries = "backbone.sparo.queries"
    ratio = moved[10.0][queries].sum() / moved[1.0][queries].sum()
    assert ratio == pytest.approx(10.0, rel=0.01)
    for name, delta in moved[1.0].items():
        if name != queries:
            torch.testing.assert_close(moved[10.0][name], delta)


def test_slot_query_lr_multiplier_refused_without_slots_and_on_changed_resume(tmp_path):
    with pytest.raises(errors.UserError, match="--readout cls"):
        dino.check_args(tiny_args(["--readout", "cls", "--sparo_query_lr_mult", "10"]))
    saved = {"param_groups": [{"lr": 0.1}, {"lr": 0.1}, {"lr": 1.0, "lr_mult": 10.0}]}
    dino.check_same_query_lr_mult(saved, 10.0, tmp_path / "checkpoint.pth")
    for asked in (1.0, 5.0):
        with pytest.raises(errors.UserError, match="trained with --sparo_query_lr_mult 10.0"):
            dino.check_same_query_lr_mult(saved, asked, tmp_path / "checkpoint.pth")
    with pytest.raises(errors.UserError, match="trained with --sparo_query_lr_mult 1.0"):
        dino.check_same_query_lr_mult({"param_groups": [{}, {}]}, 10.0, tmp_path / "checkpoint.pth")


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("arch: vit_tiny\nepochs: 7\nlocal_crops_scale: [0.1, 0.3]\n")
    parser = dino.get_args_parser()
    args = config_files.parse_args_with_config(parser, ["--config", str(config), "--epochs", "3"])
    assert args.arch == "vit_tiny" and args.epochs == 3 and list(args.local_crops_scale) == [0.1, 0.3]
    (tmp_path / "bad.yaml").write_text("arch: vit_tiny\nnot_a_flag: 1\n")
    with pytest.raises(SystemExit):
        config_files.parse_args_with_config(dino.get_args_parser(), ["--config", str(tmp_path / "bad.yaml")])


def test_shipped_configs_parse():
    recipes = [*sorted((REPO / "configs").glob("*.yaml")),
               *sorted((REPO / "configs" / "quality").glob("recipe*.yaml"))]
    assert len(recipes) >= 5
    for path in recipes:
        args = config_files.parse_args_with_config(dino.get_args_parser(), ["--config", str(path)])
        assert args.arch in vits.ARCHS, path


def test_augmentation_produces_the_crops_asked_for():
    from PIL import Image
    transform = dino.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 3, 28, 12)
    crops = transform(Image.new("RGB", (28, 28), (120, 30, 200)))
    assert [tuple(c.shape) for c in crops] == [(3, 28, 28)] * 2 + [(3, 12, 12)] * 3


def test_grey_images_augment_exactly_like_their_rgb_copies():
    """The single-channel path (build_dataset(grey=True)) is a speed-up only: the same random
    draws give the same crops as the RGB image."""
    import random
    from PIL import Image
    transform = dino.DataAugmentationDINO((0.3, 1.0), (0.1, 0.3), 2, 28, 14)
    images, _ = datasets.load_digits_split("train")
    for i in range(40):
        grey = Image.fromarray((images[i] * 16).clip(0, 255).astype(np.uint8), mode="L").resize((28, 28))
        random.seed(i), torch.manual_seed(i)
        from_grey = transform(grey)
        random.seed(i), torch.manual_seed(i)
        from_rgb = transform(grey.convert("RGB"))
        assert [c.shape[0] for c in from_grey] == [3] * 4
        for a, b in zip(from_grey, from_rgb):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_head_width_flags_reach_the_head_and_the_checkpoint_config():
    args = tiny_args(["--head_hidden_dim", "48", "--head_bottleneck_dim", "12"])
    student, _, _, head_config = dino.build_student_teacher(args)
    linears = [m for m in student.head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 48), (48, 48), (48, 12)]
    assert student.head.last_layer.weight_v.shape == (args.out_dim, 12)
    assert head_config["hidden_dim"] == 48 and head_config["bottleneck_dim"] == 12
    defaults = dino.build_student_teacher(tiny_args())[3]  # DINO's head unless asked otherwise
    assert (defaults["hidden_dim"], defaults["bottleneck_dim"]) == (2048, 256)


def test_cpu_bf16_uses_explicit_attention_with_the_same_result():
    torch.manual_seed(0)
    args = tiny_args(["--cpu_bf16", "true"])
    student, teacher, _, _ = dino.build_student_teacher(args)
    attentions = [m for m in student.modules() if hasattr(m, "fused_attn")]
    assert attentions and not any(m.fused_attn for m in attentions)
    reference = dino.build_student_teacher(tiny_args())[0]  # fp32: torch's fused kernel
    assert all(m.fused_attn for m in reference.modules() if hasattr(m, "fused_attn"))
    reference.load_state_dict(student.state_dict())
    student.eval(), reference.eval()  # no stochastic depth
    images = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(student.backbone(images), reference.backbone(images), atol=1e-5, rtol=1e-4)


def test_model_fits_check_counts_every_weight_of_the_real_model(monkeypatch):
    """Student, gradients, teacher and AdamW's two moments of every parameter (counted here on
    the real model) against the device's memory: refused one byte short, accepted at the limit."""
    args = tiny_args()
    needed = 5 * 4 * sum(p.numel() for p in dino.build_student_teacher(args)[0].parameters())
    monkeypatch.setattr(devices, "device_memory_bytes", lambda device: needed)
    dino.check_model_fits(args)
    monkeypatch.setattr(devices, "device_memory_bytes", lambda device: needed - 1)
    with pytest.raises(errors.UserError, match="the model does not fit: the DINO head has"):
        dino.check_model_fits(args)


@pytest.mark.parametrize("flags, native", [({"avx2", "fma"}, False), ({"avx2", "avx512_bf16"}, True),
                                           ({"amx_bf16"}, True)])
def test_cpu_bf16_falls_back_to_fp32_without_native_bf16(monkeypatch, capsys, flags, native):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    args = tiny_args(["--cpu_bf16", "true"])
    reason = dino.fall_back_from_emulated_bf16(args)
    warning = capsys.readouterr().err
    assert args.cpu_bf16 is native and dino.precision(args) == ("bf16 autocast" if native else "fp32")
    if native:
        assert reason is None and warning == ""
    else:
        assert "torch's CPU capability: AVX2" in reason and "avx512_bf16, amx_bf16" in reason
        assert warning.count("\n") == 1 and warning.startswith("Warning: --cpu_bf16 ignored: " + reason)
    assert dino.fall_back_from_emulated_bf16(tiny_args()) is None  # not asked for: nothing to say


class SlowLoader:
    """Four batches, each taking 50 ms to arrive (a data-loading bottleneck)."""

    def __len__(self):
        return 4

    def __iter__(self):
        for i in range(4):
            time.sleep(0.05)
            yield i


def test_progress_line_has_dinos_time_data_and_max_mem_fields(capsys):
    import resource

    logger = utils.MetricLogger()
    for _ in logger.log_every(SlowLoader(), 2, "Epoch: [0/1]", samples_per_iter=8):
        time.sleep(0.02)  # the training step
    lines = [line for line in capsys.readouterr().out.splitlines() if "eta:" in line]
    assert [line.split("]  [")[1][:3] for line in lines] == ["0/4", "2/4", "3/4"]
    fields = re.search(r"time: ([\d.]+)  data: ([\d.]+)  max mem: (\d+)  img/s: ([\d.]+)", lines[-1])
    assert fields, lines[-1]
    iteration, data, memory, throughput = map(float, fields.groups())
    assert 0.05 <= data < 0.2 and iteration >= data + 0.02  # means over the 4 iterations
    assert memory == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, abs=2)
    assert 0 < throughput < 8 / 0.07  # 8 images per iteration of at least 70 ms


# ------------------------------------------------------------------- real runs (digits)
@pytest.mark.slow
def test_compile_flag_compiles_student_and_teacher_with_the_eager_loss(tmp_path, monkeypatch):
    """--compile hands the student and the teacher to torch.compile, and training gives the eager
    losses (4 iterations, relative difference <= 1e-4). The test compiles with the aot_eager
    backend: dynamo's graph capture and AOT autograd as with inductor, without inductor's C++
    code generation (it took over 10 minutes for this model on the shared 2-core machine)."""
    compiled, real_compile = [], torch.compile

    def recording_compile(model, **options):
        compiled.append(model)
        return real_compile(model, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    losses = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        dino.main([*TINY_TRAIN_ARGS, "--arch", "vit_nano", "--subset", "64", "--batch_size_per_gpu", "16",
                   "--epochs", "1", "--drop_path_rate", "0", "--compile", flag, "--output_dir", str(out)])
        losses[flag] = read_log(out / "log.txt")[0]["train_loss"]
        state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["teacher"]
        assert not any("_orig_mod" in key for key in state)  # checkpoints keep DINO's layout
    assert len(compiled) == 2 and all(isinstance(m, vits.MultiCropWrapper) for m in compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)

@pytest.mark.slow
def test_one_epoch_then_resume(tmp_path, tiny_sparo_checkpoint):
    out = tmp_path / "run"  # a copy of the shared run: TINY_TRAIN_ARGS, --epochs 1
    shutil.copytree(tiny_sparo_checkpoint.parent, out)
    first_stdout = (out / "stdout.txt").read_text()
    assert "Epoch: [0/1]" in first_stdout and "eta:" in first_stdout
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert {"student", "teacher", "optimizer", "args", "dino_loss", "fp16_scaler", "model_config"} <= set(checkpoint)
    assert "backbone.sparo.queries" in checkpoint["teacher"]
    assert checkpoint["model_config"]["readout"] == "sparo" and checkpoint["args"]["arch"] == "vit_tiny"
    log = read_log(out / "log.txt")
    assert len(log) == 1 and log[0]["epoch"] == 0 and math.isfinite(log[0]["train_loss"])
    assert {"train_loss", "train_lr", "train_wd", "epoch", "epoch_seconds"} <= set(log[0])
    assert log[0]["epoch_seconds"] > 0

    # resumed as a checkpoint of an older version, without its own log: log.txt's epoch 0 stays
    torch.save({k: v for k, v in checkpoint.items() if k != "train_log"}, out / "checkpoint.pth")
    second = run_script("main_dino_sparo.py", *TINY_TRAIN_ARGS, "--epochs", "2", "--output_dir", out)
    assert "at epoch 1" in second.stdout and "Epoch: [0/2]" not in second.stdout
    assert [entry["epoch"] for entry in read_log(out / "log.txt")] == [0, 1]
    resumed = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2
    changed = resumed["teacher"]["backbone.sparo.queries"] - checkpoint["teacher"]["backbone.sparo.queries"]
    assert changed.abs().max() > 0


@pytest.mark.slow
def test_every_variant_trains_under_two_process_gloo(tmp_path):
    """Every read-out and SPARO option, 2 iterations each, under torchrun with 2 processes in
    one launch: DDP stops on a parameter that gets no gradient (the separate-values key bias did)."""
    from ddp_variants import VARIANTS

    covered = {flags[flags.index("--readout") + 1] for flags in VARIANTS.values()}
    assert covered == set(vits.READOUTS), "a read-out is missing from tests/ddp_variants.py"
    # gloo on the CPU even on a GPU host (two NCCL ranks would share one GPU there)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
         str(REPO / "tests" / "ddp_variants.py"), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    for name in VARIANTS:
        checkpoint = torch.load(tmp_path / name / "checkpoint.pth", map_location="cpu", weights_only=True)
        assert checkpoint["args"]["world_size"] == 2 and checkpoint["epoch"] == 1, name
        log = read_log(tmp_path / name / "log.txt")
        assert len(log) == 1 and math.isfinite(log[0]["train_loss"]), name
    # 64 images / (2 processes x 16) = 2 iterations per variant, both run
    assert process.stdout.count("[1/2]") == len(VARIANTS)
