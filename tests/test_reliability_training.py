"""Reliability of pre-training: exact resume, kill -9 at any moment, NaN stops, bad input."""
import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import errors
import main_dino_sparo as dino
import run_folder
import weight_files
from helpers import REPO, TINY_TRAIN_ARGS, Payload, read_log, run_script

EPOCHS = 3
RUN_ARGS = [*TINY_TRAIN_ARGS, "--subset", "128", "--batch_size_per_gpu", "16", "--seed", "5"]
# The runs that train: vit_nano, as resuming, stopping and locking do not depend on the size.
# (RUN_ARGS stays vit_tiny for the cases that resume the shared vit_tiny checkpoint.)
TRAIN_ARGS = [*RUN_ARGS, "--arch", "vit_nano"]


def folder_digest(folder, skip=()):
    """Hash of every file (name and bytes) under a folder but `skip` and the TensorBoard
    curves (written by every start, like run_record.jsonl), to prove nothing was touched."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name not in skip and "tensorboard" not in path.parts:
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def train(out, epochs, check=True):
    return run_script("main_dino_sparo.py", *TRAIN_ARGS, "--epochs", epochs, "--output_dir", out, check=check)


def assert_same_weights(path_a, path_b):
    a = torch.load(path_a, map_location="cpu", weights_only=True)
    b = torch.load(path_b, map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"]
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])


def without_times(log):
    return [{key: value for key, value in entry.items() if key != "epoch_seconds"} for entry in log]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(out, EPOCHS)
    return out


def start_training(out):
    command = [sys.executable, str(REPO / "main_dino_sparo.py"), *TRAIN_ARGS, "--epochs", str(EPOCHS),
               "--output_dir", str(out)]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_resume_at_epoch_boundary_equals_uninterrupted_run(uninterrupted, tmp_path):
    # Stop the run (same arguments) right after its first epoch is saved, then rerun it.
    # (A run started with fewer --epochs would differ: the schedules span all epochs.)
    process = start_training(tmp_path)
    log = tmp_path / "log.txt"
    while process.poll() is None and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_epoch = read_log(log)[0]
    second = train(tmp_path, EPOCHS)
    assert "Resuming from" in second.stdout and "at epoch 1" in second.stdout
    assert_same_weights(uninterrupted / "checkpoint.pth", tmp_path / "checkpoint.pth")
    resumed_log = read_log(log)
    # the first process's epoch (its time included) survives the resume; the rest equals
    # an uninterrupted run's log but for the epoch times
    assert resumed_log[0] == first_epoch and first_epoch["epoch_seconds"] > 0
    assert without_times(resumed_log) == without_times(read_log(uninterrupted / "log.txt"))


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing(uninterrupted, tmp_path):
    """Kill training several times, once during a checkpoint write, and resume each time."""
    rng = random.Random(0)
    killed_during_write = False
    for attempt in range(12):
        process = start_training(tmp_path)
        deadline = time.time() + (rng.uniform(3.0, 12.0) if attempt < 4 else 600)
        while process.poll() is None and time.time() < deadline:
            writing = list(tmp_path.glob(".checkpoint.pth.tmp.*"))
            if writing and not killed_during_write:
                process.send_signal(signal.SIGKILL)
                killed_during_write = True
                break
            time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        if process.returncode == 0:
            break
        # whatever the moment, what is on disk is a readable checkpoint or nothing
        if (tmp_path / "checkpoint.pth").exists():
            torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert process.returncode == 0, process.stderr.read()
    assert killed_during_write, "no kill landed during a checkpoint write"
    assert not list(tmp_path.glob(".*.tmp.*"))
    assert_same_weights(uninterrupted / "checkpoint.pth", tmp_path / "checkpoint.pth")
    assert [entry["epoch"] for entry in read_log(tmp_path / "log.txt")] == list(range(EPOCHS))
    # TensorBoard: every curve continues across the kills, each iteration once, with the
    # uninterrupted run's values (an interrupted run's steps past its checkpoint are purged)
    for tag in ("train/loss", "train/teacher_entropy", "train/lr"):
        assert tensorboard_curve(tmp_path, tag) == tensorboard_curve(uninterrupted, tag)


def tensorboard_curve(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    reader.Reload()
    return [(event.step, event.value) for event in reader.Scalars(tag)]


@pytest.mark.slow
def test_nan_loss_stops_with_epoch_and_iteration_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    dino.main([*TRAIN_ARGS, "--epochs", "1", "--output_dir", str(tmp_path)])
    saved = folder_digest(tmp_path, skip=["run_record.jsonl"])  # the failed start is recorded
    real_forward = dino.DINOLoss.forward
    calls = {"n": 0}

    def poisoned_forward(self, student_output, teacher_output, epoch):
        loss, teacher_entropy = real_forward(self, student_output, teacher_output, epoch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), teacher_entropy  # epoch 1, iteration 3

    monkeypatch.setattr(dino.DINOLoss, "forward", poisoned_forward)
    with pytest.raises(SystemExit) as stop:
        dino.main([*TRAIN_ARGS, "--epochs", "2", "--output_dir", str(tmp_path)])
    assert stop.value.code == 3
    message = capsys.readouterr().err
    assert "loss is nan at epoch 1, iteration 3" in message
    assert folder_digest(tmp_path, skip=["run_record.jsonl"]) == saved
    assert len((tmp_path / "run_record.jsonl").read_text().splitlines()) == 2


def test_collapse_warning_only_for_uniform_teacher(capsys):
    dino.warn_if_collapsed(np.log(1000) * 0.999, 1000, epoch=3)
    assert "collapsing" in capsys.readouterr().out
    dino.warn_if_collapsed(np.log(1000) * 0.5, 1000, epoch=3)
    assert "collapsing" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input
def write_images(folder, count=8, size=16, bad=()):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for name in bad:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def run_in_process(argv):
    """main_dino_sparo's command line in this process (no interpreter start-up per case):
    the exit status, stdout and stderr that `python main_dino_sparo.py ARGV` would give."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            errors.run_main(lambda: dino.main([str(a) for a in argv]))
            status = 0
        except SystemExit as stop:
            status = stop.code
    return subprocess.CompletedProcess(argv, status, stdout.getvalue(), stderr.getvalue())


def run_bad(tmp_path, *args, in_process=True):
    out = tmp_path / "out"
    before = folder_digest(out) if out.exists() else None
    argv = [*RUN_ARGS, "--epochs", "1", "--output_dir", out, *args]
    process = run_in_process(argv) if in_process else run_script("main_dino_sparo.py", *argv, check=False)
    after = folder_digest(out) if out.exists() else None
    return process, before, after


BAD_INPUT = [
    ("missing data folder", lambda d: ["--data_path", str(d / "nowhere")], "does not exist"),
    ("empty data folder", lambda d: (d / "empty").mkdir() or ["--data_path", str(d / "empty")], "holds no images"),
    ("non-image folder", lambda d: ((d / "txt" / "cls").mkdir(parents=True), (d / "txt" / "cls" / "a.txt").write_text("x"))
     and ["--data_path", str(d / "txt")], "holds no images"),
    ("crop not a multiple of patch", lambda d: ["--global_crops_size", "18"], "not a multiple of --patch_size"),
    ("L*V that does not fit", lambda d: ["--sparo_slots", "4096", "--sparo_dim", "4096"], "does not fit: the DINO head"),
    ("batch larger than data", lambda d: ["--batch_size_per_gpu", "1000"], "larger than the data set"),
    ("output dir under a file", lambda d: (d / "file").write_text("x") and ["--output_dir", str(d / "file" / "sub")],
     "cannot create --output_dir"),
    ("unknown optimizer via config", lambda d: (d / "c.yaml").write_text("optimizer: adam\n") and ["--config", str(d / "c.yaml")],
     "invalid choice"),
    # flags that would train nonsense quietly, or died in a traceback (issue 24)
    ("negative learning rate", lambda d: ["--lr", "-1"], "--lr: must be a positive number, got -1"),
    ("one prototype", lambda d: ["--out_dim", "1"], "--out_dim: must be at least 2"),
    ("teacher momentum above 1", lambda d: ["--momentum_teacher", "2"], "--momentum_teacher: must lie between 0 and 1"),
    ("zero crop sizes", lambda d: ["--global_crops_size", "0", "--local_crops_size", "0"],
     "--global_crops_size: must be a positive integer"),
    ("zero patch size", lambda d: ["--patch_size", "0"], "--patch_size: must be a positive integer"),
    ("zero print frequency", lambda d: ["--print_freq", "0"], "--print_freq: must be a positive integer"),
    ("negative number of workers", lambda d: ["--num_workers", "-1"], "--num_workers: must be 0 or more"),
    ("crop scale the wrong way round", lambda d: ["--local_crops_scale", "0.4", "0.05"], "MIN MAX"),
    ("YAML list for a one-value flag", lambda d: (d / "c.yaml").write_text("lr: [0.1, 0.2]\n")
     and ["--config", str(d / "c.yaml")], "--lr takes one value"),
    ("YAML scalar for a two-value flag", lambda d: (d / "c.yaml").write_text("global_crops_scale: 0.5\n")
     and ["--config", str(d / "c.yaml")], "--global_crops_scale takes 2 values"),
    ("YAML value out of range", lambda d: (d / "c.yaml").write_text("global_crops_size: 0\n")
     and ["--config", str(d / "c.yaml")], "global_crops_size: must be a positive integer"),
]


@pytest.mark.parametrize("case,make_args,message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gives_one_clear_line(tmp_path, case, make_args, message):
    process, before, after = run_bad(tmp_path, *make_args(tmp_path))
    assert process.returncode == 2
    assert message in process.stderr
    assert "Traceback" not in process.stderr
    # the error is the last line, not buried under the dump of every argument
    assert process.stderr.strip().splitlines()[-1].startswith("error:")
    assert "batch_size_per_gpu:" not in process.stdout
    assert before == after


def make_existing_run(tmp_path, checkpoint_bytes=None, obj=None):
    out = tmp_path / "out"
    out.mkdir()
    if obj is not None:
        torch.save(obj, out / "checkpoint.pth")
    if checkpoint_bytes is not None:
        (out / "checkpoint.pth").write_bytes(checkpoint_bytes)
    (out / "log.txt").write_text('{"epoch": 0}\n')


def test_truncated_checkpoint_is_refused_not_overwritten(tmp_path, tiny_sparo_checkpoint):
    make_existing_run(tmp_path, checkpoint_bytes=tiny_sparo_checkpoint.read_bytes()[:5000])
    process, before, after = run_bad(tmp_path)
    assert process.returncode == 2 and "none is readable" in process.stderr
    assert "Traceback" not in process.stderr and before == after


def test_resume_takes_checkpoint_pth_else_the_newest_readable_numbered_one(tmp_path, capsys):
    """The one resume rule (training, warm start and the launcher follow it): checkpoint.pth,
    and when it cannot be read the newest --saveckp_freq copy, by epoch, not by age."""
    for epoch in (9, 10, 2):
        torch.save({"student": {}, "teacher": {}, "epoch": epoch + 1}, tmp_path / run_folder.numbered_checkpoint(epoch))
    (tmp_path / run_folder.CHECKPOINT).write_bytes(b"torn by a full disk")
    path, checkpoint = run_folder.find_resume_checkpoint(tmp_path)
    assert path.name == "checkpoint0010.pth" and checkpoint["epoch"] == 11
    assert "Skipping unreadable checkpoint" in capsys.readouterr().out
    torch.save({"student": {}, "teacher": {}, "epoch": 12}, tmp_path / run_folder.CHECKPOINT)
    assert run_folder.find_resume_checkpoint(tmp_path)[0].name == run_folder.CHECKPOINT


def test_resume_orders_numbered_checkpoints_by_epoch_past_four_digits(tmp_path):
    """From epoch 10000 on, numbered_checkpoint's names have five digits: still resume candidates,
    and newer than every four-digit one."""
    for epoch in (999, 9999, 10000):
        (tmp_path / run_folder.numbered_checkpoint(epoch)).write_bytes(b"")
    (tmp_path / "checkpoint_best.pth").write_bytes(b"")  # not a numbered checkpoint
    assert [path.name for path in run_folder.resume_candidates(tmp_path)] == \
        ["checkpoint10000.pth", "checkpoint9999.pth", "checkpoint0999.pth"]


def test_a_checkpoint_without_its_own_log_keeps_log_txt(tmp_path):
    """The log restored on resume: the checkpoint's train_log; without one (an older version's
    checkpoint), log.txt's records of the epochs it holds, never an empty log."""
    records = [{"epoch": epoch, "train_loss": 5.0 - epoch} for epoch in range(3)]
    assert run_folder.saved_history({"epoch": 2}, tmp_path) == []  # no log.txt: nothing to keep
    (tmp_path / run_folder.LOG).write_text("".join(json.dumps(record) + "\n" for record in records))
    assert run_folder.saved_history({"epoch": 2}, tmp_path) == records[:2]
    assert run_folder.saved_history({"epoch": 2, "train_log": records[:1]}, tmp_path) == records[:1]


def test_hostile_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    make_existing_run(tmp_path, obj={"student": Payload(marker), "teacher": {}, "epoch": 1})
    process, before, after = run_bad(tmp_path, in_process=False)  # a real process: its stderr is one line
    assert process.returncode == 2 and "none is readable" in process.stderr
    assert not marker.exists()
    assert before == after
    with pytest.raises(errors.UserError, match="refused by safe loading"):
        weight_files.load_checkpoint(tmp_path / "out" / "checkpoint.pth")
    assert not marker.exists()


def test_resuming_with_other_architecture_is_refused(tmp_path, tiny_sparo_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(tiny_sparo_checkpoint.read_bytes())
    process, before, after = run_bad(tmp_path, "--readout", "cls", "--sparo_slots", "8")
    assert process.returncode == 2
    assert "belongs to a different run" in process.stderr
    assert "readout ('sparo' saved, 'cls' asked)" in process.stderr and "sparo_slots" in process.stderr
    assert before == after


def test_resuming_an_optimizer_state_of_other_parameters_is_one_line(tmp_path, tiny_sparo_checkpoint):
    """A checkpoint whose optimizer state lists one parameter more than the model has (as a
    separate-values SPARO run saved with its key bias did) is refused in one line, untouched."""
    checkpoint = torch.load(tiny_sparo_checkpoint, map_location="cpu", weights_only=True)
    group = checkpoint["optimizer"]["param_groups"][0]
    group["params"] = [*group["params"], max(p for g in checkpoint["optimizer"]["param_groups"]
                                             for p in g["params"]) + 1]
    make_existing_run(tmp_path, obj=checkpoint)
    process, before, after = run_bad(tmp_path)
    assert process.returncode == 2, process.stderr
    assert "optimizer state does not fit" in process.stderr and "Traceback" not in process.stderr
    assert before == after


@pytest.mark.slow
def test_unreadable_images_are_skipped_in_pretraining(tmp_path):
    data = tmp_path / "data"
    write_images(data / "a", count=40, bad=["broken.png"])
    out = tmp_path / "out"
    process = run_script("main_dino_sparo.py", *TRAIN_ARGS, "--data_path", data, "--epochs", "1",
                         "--output_dir", out, "--batch_size_per_gpu", "8")
    assert "skipping unreadable image" in process.stderr and "broken.png" in process.stderr
    assert (out / "checkpoint.pth").exists()


def test_evaluation_data_fails_on_unreadable_image_with_its_name(tmp_path):
    write_images(tmp_path / "val" / "a", count=2, bad=["broken.png"])
    dataset = datasets.build_dataset(str(tmp_path), "test")
    with pytest.raises(errors.UserError, match="broken.png"):
        [dataset[i] for i in range(len(dataset))]


def test_image_modes_load_as_8bit_rgb(tmp_path):
    grey = Image.fromarray(np.full((4, 5), 100, np.uint8), "L")
    rgba = Image.fromarray(np.dstack([np.full((4, 5), v, np.uint8) for v in (10, 20, 30, 255)]), "RGBA")
    deep = Image.fromarray(np.full((4, 5), 65535 // 2, np.uint16))
    palette = grey.convert("P")
    for name, image, expected in [("grey.png", grey, (100, 100, 100)), ("rgba.png", rgba, (10, 20, 30)),
                                  ("deep.png", deep, (127, 127, 127)), ("palette.png", palette, (100, 100, 100))]:
        image.save(tmp_path / name)
        loaded = datasets.load_rgb_image(str(tmp_path / name))
        assert loaded.mode == "RGB" and loaded.size == (5, 4), name
        assert tuple(np.asarray(loaded)[0, 0]) == expected, name


def test_missing_fashion_mnist_says_how_to_install(monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", ("/nonexistent",))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    with pytest.raises(errors.UserError, match="apt-get install dataset-fashion-mnist"):
        datasets.build_dataset("fashion_mnist", "train")


# ------------------------------------------------------------------ issue 24: silent wrong runs
def test_output_dir_lock_and_resume_notes(tmp_path, monkeypatch):
    """A lock left by a dead run is no obstacle; a live one refuses a second run, naming its
    holder, and touches nothing; a resume with another --lr/--data_path says so in one line."""
    out = tmp_path / "out"
    out.mkdir()
    (out / run_folder.LOCK).write_text("a training run, pid 999999 on a-node-that-died\n")
    first = run_in_process([*TRAIN_ARGS, "--epochs", "1", "--output_dir", out])
    assert first.returncode == 0, first.stderr
    assert not (out / run_folder.LOCK).exists()  # released and removed at the end
    assert [entry["epoch"] for entry in read_log(out / "log.txt")] == [0]

    saved = folder_digest(out)
    monkeypatch.setattr(run_folder, "LOCK_WAIT_S", 1.0)  # how long a second run waits for the holder to exit
    with open(out / run_folder.LOCK, "w") as held:  # what a running training holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("a training run, pid 4242 on gpu-node-7\n")
        held.flush()
        second, _, _ = run_bad(tmp_path, "--arch", "vit_nano")
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: --output_dir {out} is in use by a training run, pid 4242 "
                                         f"on gpu-node-7 ({out / run_folder.LOCK}); wait for that run to "
                                         f"end or choose another --output_dir")
    (out / run_folder.LOCK).unlink()
    assert folder_digest(out) == saved

    data = tmp_path / "data"
    write_images(data / "a", count=16)
    resumed = run_in_process([*TRAIN_ARGS, "--epochs", "1", "--output_dir", out, "--lr", "0.001",
                              "--data_path", data])
    assert resumed.returncode == 0, resumed.stderr
    notes = [line for line in resumed.stdout.splitlines() if "changed arguments" in line]
    assert notes == [f"Note: resuming with changed arguments: --lr 0.001 (was 0.0005), "
                     f"--data_path {data} (was digits)."]


def test_nan_before_any_checkpoint_says_so_and_leaves_no_empty_log(tmp_path, monkeypatch):
    real_forward = dino.DINOLoss.forward
    def nan_forward(*args):
        loss, teacher_entropy = real_forward(*args)
        return loss * float("nan"), teacher_entropy

    monkeypatch.setattr(dino.DINOLoss, "forward", nan_forward)
    out = tmp_path / "out"
    stopped = run_in_process([*TRAIN_ARGS, "--epochs", "1", "--output_dir", out])
    assert stopped.returncode == 3
    assert "no checkpoint was written yet" in stopped.stderr and "untouched" not in stopped.stderr
    # only the run record of the start and its curves (issue 20): no empty log.txt, no lock file
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "run_record.jsonl", "tensorboard"]


def test_symlink_loops_and_fifos_in_a_data_folder(tmp_path):
    """Links are followed, each file counted once, loops end; a FIFO named like an image
    (which would block the loader forever) is not an image."""
    data = tmp_path / "data"
    write_images(data / "a", count=3)
    write_images(data / "b", count=2)
    (data / "a" / "loop").symlink_to("..")          # back to the data folder
    (data / "b" / "self").symlink_to(".")            # to itself
    (data / "b" / "again.png").symlink_to("0.png")  # the same file twice
    (data / "up").symlink_to(".")                    # a "class" that is the data folder
    os.mkfifo(data / "a" / "x.jpg")
    pretrain = datasets.build_dataset(str(data), "pretrain")
    assert len(pretrain) == 5
    assert datasets.dataset_labels(pretrain).tolist() == [0, 0, 0, 1, 1]
    flat = tmp_path / "flat"
    write_images(flat, count=4)
    (flat / "loop").symlink_to(".")
    os.mkfifo(flat / "pipe.png")
    assert len(datasets.build_dataset(str(flat), "pretrain")) == 4


def test_ordinary_folders_list_the_same_samples_as_torchvision(tmp_path):
    """The own folder scan (links, FIFOs) keeps torchvision ImageFolder's classes and order."""
    from torchvision.datasets import ImageFolder

    for name in ["c1/t.png", "c1/sub/x.png", "c1/b-c.png", "c1/b/y.png", "c2/a.jpg", "c2/Z.PNG",
                 "c2/zz/q.png", "c2/notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not read here")
    ours = datasets.image_folder(str(tmp_path))
    reference = ImageFolder(str(tmp_path))
    assert ours.samples == [tuple(sample) for sample in reference.samples]
    assert ours.classes == reference.classes
