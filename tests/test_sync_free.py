"""Host syncs of the device stage and the training step (issue 30): the device stage never waits
for the device, a training step only at the end of a print window, once. Counted on the CPU by
bench/host_syncs.HostSyncRecorder (every op that reads a device value on the host, has a
data-dependent shape or copies between host and device); on CUDA (marker gpu) torch's sync
debug mode must stay silent as well."""
import argparse
import contextlib
import itertools
from pathlib import Path

import pytest
import torch

import main_dino_sparo as dino
import tensorboard_log
import utils
from bench import host_syncs
from bench.host_syncs import HostSyncRecorder
from helpers import TINY_TRAIN_ARGS, run_two_gloo_ranks

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def training(device, output_dir):
    """A SPARO run on real images (digits) with the device stage: its loader (uint8 crops from
    the CPU stage) and its TrainStep, on `device`."""
    parser = argparse.ArgumentParser(parents=[dino.get_args_parser()])
    args = parser.parse_args([*map(str, TINY_TRAIN_ARGS), "--subset", "64", "--batch_size_per_gpu", "16",
                              "--augment_on_device", "true", "--output_dir", str(output_dir)])
    args.rank, args.world_size, args.distributed = 0, 1, False
    args.device, args.gpu = torch.device(device), 0 if device == "cuda" else None
    torch.manual_seed(0)
    loader = dino.build_data_loader(args)
    models, optimisation = dino.build_training(args)
    return args, loader, dino.TrainStep(models, optimisation, args)


@contextlib.contextmanager
def cuda_sync_is_an_error(device):
    """On CUDA, torch's own check too: any synchronising CUDA call inside raises."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def described(syncs):
    return "\n".join(map(str, syncs))


def test_the_recorder_finds_every_kind_of_host_sync():
    x = torch.rand(8)
    with HostSyncRecorder() as recorder:
        x.nonzero()
        float(x.sum())
        bool(x.max() > 0.5)
        x[x > 0.5]
        torch.tensor([1.0], device=x.device)
        x[1:3] = torch.tensor([1.0, 2.0])  # Python data into a device tensor
        x[torch.tensor([1, 2])]  # integer indices: no sync
        x[0] = 0.5  # a fill: no sync
        torch.zeros(3).sum().item()  # a host tensor: no sync
        torch.zeros(2).copy_(x[:2])
        host = x.sum().cpu()
        host.item(), host.tolist()  # already on the host: no further sync
    assert [s.kind for s in recorder.syncs] == [
        "data-dependent shape", "value read", "value read", "data-dependent shape",
        "blocking copy from host", "blocking copy from host", "copy to host", "copy to host"], \
        described(recorder.syncs)
    assert all(s.where.startswith("tests/test_sync_free.py:") for s in recorder.syncs)
    assert recorder.kernels > 10 and recorder.total_ops >= recorder.kernels


@pytest.mark.parametrize("device", DEVICES)
def test_the_device_stage_never_waits_for_the_device(device, tmp_path):
    args, loader, step = training(device, tmp_path)
    crops = [crop.to(args.device) for crop in next(iter(loader))[0]]
    assert crops[0].dtype == torch.uint8 and step.augment is not None
    step.augment(crops)  # the first call copies a few per-channel constants to the device, once
    with HostSyncRecorder() as recorder, cuda_sync_is_an_error(args.device):
        out = step.augment(crops)
    assert recorder.syncs == [], described(recorder.syncs)
    assert recorder.kernels > 100  # it did record the stage
    assert [o.shape for o in out] == [c.shape[:1] + (3,) + c.shape[2:] for c in crops]
    assert all(bool(torch.isfinite(o).all()) for o in out)


@pytest.mark.parametrize("device", DEVICES)
def test_a_training_step_waits_only_at_the_end_of_a_print_window(device, tmp_path):
    args, loader, step = training(device, tmp_path)
    batches = [[im.to(args.device) for im in images] for images, _ in itertools.islice(loader, 3)]
    schedules = dino.build_schedules(args, len(loader))
    board = tensorboard_log.TrainingBoard(tmp_path, first_step=0)
    tracker = dino.StepStatsTracker()

    def train(it):  # what train_one_epoch does per iteration, print windows aside
        result = step(batches[it], 0, float(schedules["lr"][it]), float(schedules["wd"][it]),
                      float(schedules["momentum"][it]))
        tracker.add(result.loss, result.teacher_entropy)
        return result.slot_attention

    loss_fn = step.optimisation.dino_loss
    slot_attention = train(0)  # creates the optimizer's state
    dino.end_window(tracker, slot_attention, loss_fn, board, schedules, 0, 1, 0)
    with HostSyncRecorder() as plain_step, cuda_sync_is_an_error(args.device):
        train(1)
    with HostSyncRecorder() as print_step:
        slot_attention = train(2)
        window = dino.end_window(tracker, slot_attention, loss_fn, board, schedules, 0, 3, 0)
    assert plain_step.syncs == [], described(plain_step.syncs)
    assert plain_step.kernels > 1000  # the device stage, forward, backward, clipping, AdamW, EMA
    assert [s.kind for s in print_step.syncs] == ["copy to host"], described(print_step.syncs)
    assert print_step.syncs[0].where.startswith("main_dino_sparo.py:")  # StepStatsTracker.flush
    assert window.shape == (2, 2) and bool(torch.isfinite(window).all())
    board.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    reader = EventAccumulator(str(tmp_path / "tensorboard"))
    reader.Reload()  # the slot statistics came to the host with the window, in that one copy
    assert [e.step for e in reader.Scalars("slots/cls_weight_mean")] == [0, 2]
    assert [e.step for e in reader.Scalars("train/loss")] == [0, 1, 2]


def _flush_on_a_rank(out):
    args = argparse.Namespace(device="cpu", dist_url="env://")
    utils.init_distributed_mode(args)
    own = torch.tensor([1.0 + args.rank], dtype=torch.float64)  # already over_ranks' dtype and device
    summed = utils.over_ranks(own)
    Path(out, f"over_ranks{args.rank}.txt").write_text(f"{own.tolist()} {summed.tolist()}")
    tracker = dino.StepStatsTracker()
    for it in range(3):
        loss = float("nan") if (args.rank, it) == (1, 1) else 0.5 + it
        tracker.add(torch.tensor(loss), torch.tensor(2.0 + args.rank))
    try:
        window, carried = tracker.flush(0, 3, carry=[torch.tensor([1.5, 2.5], dtype=torch.float32)])
        result = f"{window.tolist()} {carried[0].tolist()} {carried[0].dtype}"
    except dino.NonFiniteLoss as error:
        result = str(error)
    Path(out, f"rank{args.rank}.txt").write_text(result)
    utils.cleanup_distributed()


def test_the_print_window_copy_keeps_its_values_and_stops_every_rank_together(tmp_path):
    tracker = dino.StepStatsTracker()
    for it in range(3):
        tracker.add(torch.tensor(0.5 + it), torch.tensor(2.0))
    window, carried = tracker.flush(0, 3, carry=[torch.tensor([[1.5], [2.5]])])
    assert window.dtype == torch.float64 and window.tolist() == [[0.5, 2.0], [1.5, 2.0], [2.5, 2.0]]
    assert carried[0].dtype == torch.float32 and carried[0].tolist() == [[1.5], [2.5]]
    assert tracker.epoch_means() == (1.5, 2.0)
    # two gloo ranks, a NaN on rank 1: both stop at the same window, each saying why
    run_two_gloo_ranks(_flush_on_a_rank, str(tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text().split(";")[0] for r in (0, 1)] == [
        "another process's loss is not finite at epoch 0, iteration 0", "loss is nan at epoch 0, iteration 1"]
    # utils.over_ranks sums a copy: a caller's own float64 CPU tensor keeps its value
    assert [(tmp_path / f"over_ranks{r}.txt").read_text() for r in (0, 1)] == ["[1.0] [3.0]", "[2.0] [3.0]"]


def test_the_op_count_benchmark_runs_and_finds_no_sync(capsys):
    results = host_syncs.main(["--arch", "vit_tiny", "--patch_size", "4", "--global_crops_size", "16",
                               "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "64",
                               "--sparo_slots", "4", "--sparo_dim", "4", "--batch_size_per_gpu", "4",
                               "--device_stage_batch", "8", "--device", "cpu"])
    assert set(results) == {"device stage", "training step"}
    for result in results.values():
        assert result["host_syncs"] == 0 and 0 < result["kernels"] <= result["ops"]
    assert "device stage:" in capsys.readouterr().out
