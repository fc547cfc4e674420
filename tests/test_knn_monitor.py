"""k-NN during pre-training (--eval_every): logged per epoch, equal to eval_knn.py, checked early."""
from __future__ import annotations

import argparse
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

import devices
import knn_monitor
import main_dino_sparo
import plot_runs
import run_folder
from helpers import TINY_TRAIN_ARGS, read_log, run_script

EVAL_ARGS = ["--eval_every", "1", "--eval_data_path", "digits", "--eval_train_subset", "600",
             "--eval_test_subset", "200", "--eval_raw_pixels", "true", "--eval_student", "true"]
RUN_ARGS = [*TINY_TRAIN_ARGS, "--arch", "vit_nano", "--subset", "64", "--batch_size_per_gpu", "16",
            "--epochs", "2", *EVAL_ARGS]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("knn_run")
    process = run_script("main_dino_sparo.py", *RUN_ARGS, "--output_dir", out)
    return out, process.stdout


@pytest.mark.slow
def test_every_epoch_logs_knn_and_the_run_ends_with_the_comparison(evaluated_run):
    out, stdout = evaluated_run
    log = read_log(out / "log.txt")
    assert [entry["epoch"] for entry in log] == [0, 1]
    for entry in log:
        assert 0 <= entry["knn_top1"] <= 100 and 0 <= entry["knn_top5"] <= 100
        assert entry["knn_top5"] >= entry["knn_top1"] and entry["knn_seconds"] > 0
    baselines = json.loads((out / "knn_baselines.json").read_text())
    assert set(baselines) == {"untrained", "raw pixels", "description"}
    assert stdout.index("k-NN of the untrained teacher") < stdout.index("Starting DINO training")
    assert "k-NN of the teacher after epoch 1" in stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("k-NN top-1") and f"epoch 1 {log[1]['knn_top1']:.2f}" in last
    assert f"(student {log[1]['student_knn_top1']:.2f})" in last
    assert f"untrained {baselines['untrained']['knn_top1']:.2f}" in last
    # raw pixels of 8x8 digits (upsampled to 16 px) are a strong floor: about 95 %
    assert baselines["raw pixels"]["knn_top1"] > 80


def assert_monitor_equals_eval_knn(out, tmp_path, device, network="teacher"):
    """The last epoch's k-NN of the teacher (or student) in log.txt equals eval_knn.py's on the
    run's checkpoint (same subsets, k and batch size, on the same device)."""
    result = tmp_path / "knn.json"
    run_script("eval_knn.py", "--pretrained_weights", out / "checkpoint.pth", "--data_path", "digits",
               "--train_subset", "600", "--test_subset", "200", "--nb_knn", "20", "--device", device,
               "--batch_size_per_gpu", "16", "--num_workers", "0", "--output_json", result,
               "--checkpoint_key", network,
               gpu=device == "cuda")
    figures = json.loads(result.read_text())["knn"]["20"]
    last = read_log(out / "log.txt")[-1]
    prefix = "" if network == "teacher" else "student_"
    assert last[prefix + "knn_top1"] == pytest.approx(figures["top1"], abs=1e-3)
    assert last[prefix + "knn_top5"] == pytest.approx(figures["top5"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("network", ["teacher", "student"])
def test_knn_during_training_equals_eval_knn_on_the_checkpoint(evaluated_run, tmp_path, network):
    out, stdout = evaluated_run
    assert_monitor_equals_eval_knn(out, tmp_path, "cpu", network)
    assert f"k-NN of the {network} after epoch 1" in stdout


@pytest.mark.slow
@pytest.mark.gpu
def test_knn_during_training_on_a_gpu_equals_eval_knn_there(tmp_path):
    """On a GPU training runs in TF32 (and bf16 autocast); the monitor evaluates in exact fp32
    as eval_knn.py does, so the two agree there too."""
    out = tmp_path / "run"
    run_script("main_dino_sparo.py", *RUN_ARGS, "--epochs", "1", "--eval_raw_pixels", "false",
               "--device", "cuda", "--output_dir", out, gpu=True)
    assert_monitor_equals_eval_knn(out, tmp_path, "cuda")


def tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_exact_fp32_inside_and_the_callers_settings_after():
    saved = tf32_flags()
    try:
        for before in [(True, True), (False, True), (False, False)]:  # (True, ...): training's
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
            for allowed in (False, True):
                with pytest.raises(KeyError), devices.tf32_allowed(allowed):
                    assert tf32_flags() == (allowed, allowed)
                    raise KeyError  # restored on the way out of an error too
                assert tf32_flags() == before
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_monitor_measures_in_exact_fp32_while_training_runs_in_tf32():
    parser = argparse.ArgumentParser(parents=[main_dino_sparo.get_args_parser()])
    args = parser.parse_args([*TINY_TRAIN_ARGS, *EVAL_ARGS, "--eval_train_subset", "300"])
    args.device = torch.device("cpu")
    monitor = knn_monitor.KnnMonitor(args, args.global_crops_size)
    seen = []

    def raw_pixels(images):
        seen.append(tf32_flags())
        return images.flatten(1)

    with devices.tf32_allowed(True):  # what enable_fast_fp32 sets for training on a GPU
        result = monitor.measure(raw_pixels)
        assert tf32_flags() == (True, True)
    assert seen and set(seen) == {(False, False)}
    assert result["top1"] > 80  # raw digits are a strong k-NN baseline


@pytest.mark.slow
def test_tensorboard_has_every_iteration_and_the_knn_points(evaluated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = evaluated_run
    reader = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    reader.Reload()
    iterations = 2 * (64 // 16)
    assert [e.step for e in reader.Scalars("train/loss")] == list(range(iterations))
    assert [e.step for e in reader.Scalars("knn/top1")] == [iterations // 2 - 1, iterations - 1]
    log = read_log(out / "log.txt")
    assert [e.value for e in reader.Scalars("knn/top1")] == pytest.approx([entry["knn_top1"] for entry in log])
    assert [e.value for e in reader.Scalars("knn_student/top1")] == \
        pytest.approx([entry["student_knn_top1"] for entry in log])
    assert {"slots/attention_entropy", "slots/cls_weight"} <= set(reader.Tags()["histograms"])
    assert {"speed/data_seconds", "speed/iter_seconds", "memory/max_mem_mib", "train/lr",
            "train/teacher_temp"} <= set(reader.Tags()["scalars"])


@pytest.mark.slow
def test_plot_starts_the_knn_curve_before_training(evaluated_run, tmp_path):
    out, _ = evaluated_run
    points = plot_runs.knn_points(read_log(out / "log.txt"), run_folder.read_baselines(out))
    assert [epoch for epoch, _ in points] == [-1, 0, 1]
    student = plot_runs.knn_points(read_log(out / "log.txt"), run_folder.read_baselines(out), "student_knn_top1")
    assert [epoch for epoch, _ in student] == [-1, 0, 1] and student[0] == points[0]
    run_script("plot_runs.py", out, "--output", tmp_path / "run.png")
    image = np.asarray(Image.open(tmp_path / "run.png").convert("L"))
    assert (image < 128).mean() > 0.005


def test_training_time_counts_the_untrained_networks_knn(tmp_path, monkeypatch, capsys):
    """The closing `Training time` runs from before the k-NN of the untrained network, as it
    did before train_epochs was split out: an hour of baselines is in it."""
    clock = types.SimpleNamespace(now=0.0)  # main_dino_sparo's clock moves only in the baselines
    monkeypatch.setattr(main_dino_sparo, "time", types.SimpleNamespace(time=lambda: clock.now))

    def hour_of_baselines(*_):
        clock.now += 3600.0
    monkeypatch.setattr(knn_monitor.KnnMonitor, "measure_baselines", hour_of_baselines)
    main_dino_sparo.main([*RUN_ARGS, "--epochs", "1", "--eval_raw_pixels", "false", "--eval_student", "false",
                          "--eval_train_subset", "100", "--eval_test_subset", "50", "--output_dir", str(tmp_path)])
    assert "Training time 1:00:00" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--eval_every", "1"], "--eval_every needs --eval_data_path"),
    (["--eval_every", "1", "--eval_data_path", "/nonexistent/eval"], "/nonexistent/eval"),
])
def test_bad_evaluation_data_stops_before_training(tmp_path, flags, message):
    process = run_script("main_dino_sparo.py", *TINY_TRAIN_ARGS, "--epochs", "1", *flags,
                         "--output_dir", tmp_path / "out", check=False)
    assert process.returncode != 0
    assert message in process.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "checkpoint.pth").exists()
    assert "Starting DINO training" not in process.stdout
