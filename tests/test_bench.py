"""Smoke tests of the benchmarks: one tiny step of each, real code paths, checked outputs."""
import pytest
import torch

from bench import augmentation_speed, knn_speed, train_throughput
from bench.dino_original import DINO_REPO
from helpers import needs_dino, needs_fashion_mnist, run_script

# A one-step timing of vit_tiny/4 on 8 px crops (bench/train_throughput.py's flags).
TINY_STEP_ARGS = ["--arch", "vit_tiny", "--patch_size", "4", "--global_crops_size", "8",
                  "--local_crops_size", "4", "--local_crops_number", "2", "--batch_size_per_gpu", "4",
                  "--out_dim", "64", "--sparo_slots", "4", "--sparo_dim", "4", "--steps", "1",
                  "--warmup_steps", "1"]


def test_train_throughput_runs_every_variant_and_reports_ratios(capsys):
    results = train_throughput.main(TINY_STEP_ARGS)
    out = capsys.readouterr().out
    assert set(results) == {"sparo", "cls", "reference"}
    for result in results.values():
        assert result["images_per_s"] > 0 and result["peak_mib"] >= 0
    assert "sparo/cls throughput ratio" in out and "sparo/reference throughput ratio" in out
    assert "device: CPU" in out


@needs_dino
def test_train_throughput_times_the_original_dino_step(capsys):
    results = train_throughput.main([*TINY_STEP_ARGS, "--dino_repo", str(DINO_REPO),
                                     "--rounds", "1", "--gemm_size", "128"])
    out = capsys.readouterr().out
    assert set(results) == {"sparo", "cls", "dino"}
    # Same model and crops: DINO's CLS step and ours count the same matrix FLOPs.
    assert results["dino"]["gflop_per_step"] == pytest.approx(results["cls"]["gflop_per_step"], rel=0.01)
    assert all(r["gflop_per_s"] > 0 for r in results.values())
    assert "cls/dino throughput ratio" in out and "% of the GEMM peak" in out
    assert not torch.distributed.is_initialized()  # its group of one is gone with it


def test_knn_speed_methods_agree_and_report_the_gemm_floor(capsys):
    summary = knn_speed.main(["--num_train", "400", "--num_test", "50", "--dim", "32",
                              "--nb_knn", "5", "20", "--gemm_size", "256"])
    out = capsys.readouterr().out
    assert set(summary["results"]) == {"torch", "faiss-cpu", "dino"}
    assert all(r["same_predictions"] for r in summary["results"].values())
    assert summary["gemm_peak_gflops"] > 0 and "x the GEMM floor" in out


def test_benchmark_scripts_run_from_the_command_line():
    process = run_script("bench/knn_speed.py", "--num_train", "200", "--num_test", "20", "--dim", "16",
                         "--nb_knn", "5", "--gemm_size", "128", "--methods", "torch", "dino")
    assert "dino/torch time ratio" in process.stdout


@needs_fashion_mnist
def test_augmentation_speed_times_both_paths(capsys):
    result = augmentation_speed.main(["--images", "10", "--rounds", "1"])
    assert result["rgb_ms_per_image"] > 0 and result["grey_ms_per_image"] > 0
    assert result["ratio"] == pytest.approx(result["grey_ms_per_image"] / result["rgb_ms_per_image"])
    assert "grey/rgb time ratio" in capsys.readouterr().out


def test_augmentation_speed_jpeg_suite_compares_dino_with_the_cpu_stage(capsys):
    result = augmentation_speed.main(["--suite", "jpeg", "--photos", "4", "--rounds", "1", "--jpeg_crops", "32", "16", "2",
                                      "--train_images", "0", "--device_batch", "2"])
    out = capsys.readouterr().out
    assert result["dino_ms_per_image"] > 0 and result["cpu_stage_ms_per_image"] > 0
    assert result["device_stage_cpu_ms_per_image"] > 0
    assert result["speedup"] == pytest.approx(result["dino_ms_per_image"] / result["cpu_stage_ms_per_image"])
    assert out.strip().splitlines()[-1] == f"cpu-stage speed-up over DINO: {result['speedup']:.2f}x"
