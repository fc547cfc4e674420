"""TensorBoard curves: read back with tensorboard's own reader; a resumed writer continues them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from tensorboard_log import TrainingBoard, slot_statistics  # noqa: E402


def read_curves(folder) -> EventAccumulator:
    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    reader.Reload()
    return reader


def scalar_steps(reader: EventAccumulator, tag: str):
    return [(event.step, event.value) for event in reader.Scalars(tag)]


def test_series_get_one_point_per_iteration(tmp_path):
    board = TrainingBoard(tmp_path, first_step=0)
    board.add_series({"train/loss": [3.0, 2.5, 2.0]}, first_step=0)
    board.add_series({"train/loss": [1.5, 1.0]}, first_step=3)
    board.add_scalars({"knn/top1": 61.5, "knn/top5": None}, step=4)
    board.close()
    reader = read_curves(tmp_path / "tensorboard")
    assert scalar_steps(reader, "train/loss") == [(0, 3.0), (1, 2.5), (2, 2.0), (3, 1.5), (4, 1.0)]
    assert scalar_steps(reader, "knn/top1") == [(4, 61.5)]
    assert "knn/top5" not in reader.Tags()["scalars"]  # None means not measured


def test_resumed_writer_hides_steps_past_the_checkpoint(tmp_path):
    """An interrupted run wrote steps 0-7 but its checkpoint was at step 5: the resumed run
    rewrites 5-9, and the reader sees each step once, with the resumed run's values."""
    first = TrainingBoard(tmp_path, first_step=0)
    first.add_series({"train/loss": [10.0 + i for i in range(8)]}, first_step=0)
    first.close()  # like kill -9 after a flush: the events are on disk
    resumed = TrainingBoard(tmp_path, first_step=5)
    resumed.add_series({"train/loss": [100.0 + i for i in range(5, 10)]}, first_step=5)
    resumed.close()
    curve = scalar_steps(read_curves(tmp_path / "tensorboard"), "train/loss")
    assert [step for step, _ in curve] == list(range(10))
    assert [value for _, value in curve] == [10.0 + i for i in range(5)] + [100.0 + i for i in range(5, 10)]


def test_a_run_killed_in_its_first_epoch_restarts_its_curves(tmp_path):
    first = TrainingBoard(tmp_path, first_step=0)
    first.add_series({"train/loss": [1.0, 2.0, 3.0]}, first_step=0)
    first.close()
    again = TrainingBoard(tmp_path, first_step=0)
    again.add_series({"train/loss": [4.0, 5.0]}, first_step=0)
    again.close()
    assert scalar_steps(read_curves(tmp_path / "tensorboard"), "train/loss") == [(0, 4.0), (1, 5.0)]


def test_a_restart_in_the_same_second_is_read_after_the_first_run(tmp_path, monkeypatch):
    """Event file names end with a per-process counter compared as text: a writer numbered 10
    opened in the same second as one numbered 9 would be read first, undoing the purge."""
    import tensorboard.summary.writer.event_file_writer as event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    first = TrainingBoard(tmp_path, first_step=0)
    first.add_series({"train/loss": [1.0, 2.0, 3.0]}, first_step=0)
    first.close()
    again = TrainingBoard(tmp_path, first_step=0)
    again.add_series({"train/loss": [4.0, 5.0]}, first_step=0)
    again.close()
    assert scalar_steps(read_curves(tmp_path / "tensorboard"), "train/loss") == [(0, 4.0), (1, 5.0)]


def test_disabled_board_writes_nothing(tmp_path):
    board = TrainingBoard(tmp_path, first_step=0, enabled=False)
    board.add_series({"train/loss": [1.0]}, first_step=0)
    board.add_slot_statistics({"cls_weight": torch.ones(4)}, step=0)
    board.close()
    assert not (tmp_path / "tensorboard").exists()


def test_slot_statistics_match_a_direct_computation(tmp_path):
    generator = torch.Generator().manual_seed(0)
    attention = torch.randn(3, 4, 1 + 9, generator=generator).softmax(-1)  # (B, L, N)
    attention[0, 1] = torch.tensor([0.5] + [0.0] * 4 + [0.5] + [0.0] * 4)  # one patch + CLS
    stats = slot_statistics(attention)
    expected_entropy = np.zeros(4)
    for slot in range(4):
        for image in range(3):
            patches = attention[image, slot, 1:].double().numpy()
            p = patches / patches.sum()
            expected_entropy[slot] += -sum(x * math.log(x) for x in p if x > 0) / 3
    np.testing.assert_allclose(stats["attention_entropy"].numpy(), expected_entropy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["cls_weight"].numpy(), attention[:, :, 0].mean(0).numpy(), rtol=1e-6)
    board = TrainingBoard(tmp_path, first_step=0)
    board.add_slot_statistics(stats, step=7)
    board.close()
    reader = read_curves(tmp_path / "tensorboard")
    assert "slots/attention_entropy" in reader.Tags()["histograms"]
    mean = scalar_steps(reader, "slots/cls_weight_mean")
    assert mean[0][0] == 7 and mean[0][1] == pytest.approx(float(attention[:, :, 0].mean()), rel=1e-5)
