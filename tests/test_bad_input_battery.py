"""The second bad-input battery (issue 32): the newer scripts and formats (export, embed, the
lr-grid eval_linear, plot_runs, YAML flag files and OUTPUT_DIR/config.yaml, model configs inside
weight files, side files of a run folder, full disks, the submitit launcher) against hostile and
careless input.

Two kinds of case:
- silent wrong results (a probe resumed from another data set, "identical" for an all-NaN
  export, a config.json beside other weights, grids that overwrite each other, names that lose
  their rows, a plot written elsewhere than announced): each test checks the right result;
- refusals: one table of (script, argv, expected words); each case must end with exit status 2
  and one `error:` line naming the problem, without a traceback.

Every case runs in this process through errors.run_main, as the command line does; the models
are untrained vit_nano backbones built here (no training run), so the battery takes seconds.
"""
import builtins
import errno
import fcntl
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import submitit
import torch
from PIL import Image

import config_files
import datasets
import embed
import errors
import eval_knn
import eval_linear
import export
import knn_monitor
import main_dino_sparo
import plot_runs
import run_folder
import run_with_submitit
import tensorboard_log
import utils
import vision_transformer as vits
import visualize_slots
import weight_files
from helpers import needs_fashion_mnist

CONFIG = dict(arch="vit_nano", patch_size=4, img_size=16, readout="sparo", sparo_slots=4, sparo_dim=4)


# ------------------------------------------------------------------------------ fixtures
def save_checkpoint(path: Path, seed: int = 0, config: dict = CONFIG, edit=None) -> Path:
    """A checkpoint in the training layout (student, teacher, model_config); edit(state) may
    damage it first."""
    model_config = vits.BackboneConfig(**config)
    torch.manual_seed(seed)
    teacher = {f"backbone.{k}": v for k, v in model_config.build().state_dict().items()}
    state = dict(student=dict(teacher), teacher=teacher, epoch=1, model_config=model_config.to_dict())
    if edit is not None:
        edit(state)
    torch.save(state, path)
    return path


def save_images(folder: Path, count: int, seed: int, size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def image_set(root: Path, seed: int, classes=("a", "b")) -> Path:
    for split, count in (("train", 6), ("val", 4)):
        for label in classes:
            save_images(root / split / label, count, seed + hash((split, label)) % 1000)
    return root


def damaged_config(**change):
    def edit(state):
        state["model_config"] = {**state["model_config"], **change}
    return edit


def feature_folder(root: Path, train_labels, test_labels) -> Path:
    root.mkdir(parents=True)
    train, test = torch.randn(len(train_labels), 8), torch.randn(len(test_labels), 8)
    for tensor, name in zip((train, test, torch.as_tensor(train_labels), torch.as_tensor(test_labels)),
                            eval_knn.FEATURE_FILES):
        torch.save(tensor, root / name)
    return root


def training_log(run: Path) -> Path:
    run.mkdir(parents=True)
    (run / "log.txt").write_text("".join(json.dumps(dict(epoch=e, train_loss=5.0 - e, train_lr=1e-4,
                                                         train_teacher_entropy=3.0)) + "\n"
                                         for e in range(3)))
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every hostile file once; tests only read them."""
    root = tmp_path_factory.mktemp("battery")
    save_checkpoint(root / "good.pth")
    save_checkpoint(root / "global_norm.pth", config={**CONFIG, "sparo_norm": "global"})
    image_set(root / "data_a", seed=0)
    image_set(root / "data_b", seed=500, classes=("cat", "dog"))

    def all_nan(state):
        state["teacher"] = {k: torch.full_like(v, float("nan")) for k, v in state["teacher"].items()}
    save_checkpoint(root / "all_nan.pth", edit=all_nan)
    save_checkpoint(root / "unknown_arch.pth", edit=damaged_config(arch="vit_colossal"))
    save_checkpoint(root / "extra_key.pth", edit=damaged_config(dropout=0.5))
    save_checkpoint(root / "wrong_type.pth", edit=damaged_config(patch_size="4"))
    save_checkpoint(root / "bool_size.pth", edit=damaged_config(sparo_slots=True))
    save_checkpoint(root / "huge_image.pth", edit=damaged_config(img_size=4 * 10**6))
    save_checkpoint(root / "config_list.pth", edit=lambda state: state.update(model_config=[1, 2]))

    feature_folder(root / "feat_negative", [0, 1, -1, 1], [0, 1])
    feature_folder(root / "feat_huge_label", [0, 1, 10**8, 1], [0, 1])
    feature_folder(root / "feat_empty_test", [0, 1, 0, 1], [])
    feature_folder(root / "feat_bad_info", [0, 1, 0, 1], [0, 1])
    (root / "feat_bad_info" / eval_knn.FEATURE_INFO).write_text('{"model_config": ')
    (root / "null.yaml").write_text("nb_knn: null\ntemperature:\n")
    (root / "int_keys.yaml").write_text("1: 2\nnb_knn: [1]\n")
    # 300 bytes that expand to 9**8 values inside one flag's value (each level defines its
    # anchor in its first item and repeats it 8 times).
    bomb = "&a [x, x, x, x, x, x, x, x, x]"
    for previous, name in zip("abcdefg", "bcdefgh"):
        bomb = f"&{name} [{bomb}, {', '.join([f'*{previous}'] * 8)}]"
    (root / "bomb.yaml").write_text(f"nb_knn: {bomb}\n")
    (root / "a_file").write_text("not a folder")
    return root


def run_main_in_process(module, argv, capsys):
    """Run module.main(argv) the way the command line does; return (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as stopped:
        errors.run_main(lambda: module.main([str(a) for a in argv]))
    captured = capsys.readouterr()
    return stopped.value.code, captured.out, captured.err


def assert_one_error_line(status, stderr, words):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, f"exit status {status}:\n{stderr[-3000:]}"
    assert lines and lines[-1].startswith("error:") and words in lines[-1], stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(lines[-1]) < 2500, f"an error line of {len(lines[-1])} characters"


def digest(folder: Path):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------- refusals: the table
def knn(w, *extra):
    return ["--nb_knn", "1", "--num_workers", "0", *extra]


def refusal_cases():
    """(name, script, argv(w, out), words of the error line)."""
    data = lambda w: ["--data_path", w / "data_a"]  # noqa: E731
    cases = []
    for name, file, words in [
            ("unknown arch", "unknown_arch.pth", "unknown arch 'vit_colossal'"),
            ("extra key", "extra_key.pth", "unknown key(s) dropout"),
            ("wrong type", "wrong_type.pth", "patch_size must be an integer, got str"),
            ("bool for a size", "bool_size.pth", "sparo_slots must be an integer, got bool"),
            ("image size allocated before any check", "huge_image.pth", "shape mismatch"),
            ("model_config not a mapping", "config_list.pth", "not a mapping")]:
        weights = lambda w, file=file: ["--pretrained_weights", w / file]  # noqa: E731
        cases += [
            (f"eval_knn: model_config {name}", eval_knn, lambda w, o, f=weights: f(w) + data(w) + knn(w), words),
            (f"export: model_config {name}", export, lambda w, o, f=weights: f(w) + ["--output_dir", o], words),
            (f"embed: model_config {name}", embed,
             lambda w, o, f=weights: f(w) + ["--data_path", w / "data_a", "--output", o / "e.npy"], words),
            (f"visualize_slots: model_config {name}", visualize_slots,
             lambda w, o, f=weights: f(w) + ["--image_path", w / "data_a" / "val" / "a" / "0.png",
                                              "--output_dir", o], words),
        ]
    good = lambda w: ["--pretrained_weights", w / "good.pth"]  # noqa: E731
    cases += [
        ("export: all-NaN model", export, lambda w, o: ["--pretrained_weights", w / "all_nan.pth",
                                                        "--output_dir", o], "non-finite features"),
        ("eval_knn: negative labels", eval_knn, lambda w, o: ["--load_features", w / "feat_negative"] + knn(w),
         "labels from -1 to 1"),
        ("eval_knn: a label of 1e8", eval_knn, lambda w, o: ["--load_features", w / "feat_huge_label"] + knn(w),
         "renumber the classes"),
        ("eval_knn: empty test set", eval_knn, lambda w, o: ["--load_features", w / "feat_empty_test"] + knn(w),
         "the test set is empty"),
        ("eval_knn: damaged features_info.json", eval_knn,
         lambda w, o: ["--load_features", w / "feat_bad_info"] + knn(w), "features_info.json"),
        ("YAML integer keys", eval_knn, lambda w, o: good(w) + data(w) + ["--config", w / "int_keys.yaml"],
         "keys must be flag names"),
        ("YAML alias bomb", eval_knn, lambda w, o: good(w) + data(w) + ["--config", w / "bomb.yaml"],
         "expands to more than"),
        ("plot_runs: output format matplotlib lacks", plot_runs,
         lambda w, o: [training_log(o / "run"), "--output", o / "runs.xyz"], "cannot write .xyz"),
    ]
    return cases


CASES = refusal_cases()


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case[0].replace(" ", "_") for case in CASES])
def test_bad_input_is_one_error_line(world, tmp_path, capsys, index):
    name, module, argv, words = CASES[index]
    out = tmp_path / "out"
    out.mkdir()
    before = digest(world)
    status, _, stderr = run_main_in_process(module, argv(world, out), capsys)
    assert_one_error_line(status, stderr, words)
    assert digest(world) == before, f"{name} changed an input file"


# ------------------------------------------------------------- eval_linear's folder
LINEAR = ["--epochs", "1", "--lr_grid", "0.1", "1", "--num_workers", "0", "--batch_size_per_gpu", "8"]


@pytest.mark.parametrize("first,second", [("digits", "fashion_mnist"), ("data_a", "data_b"),
                                          ("digits", "digits --train_subset 11")])
def test_linear_probe_refuses_heads_trained_on_another_data_set(world, tmp_path, capsys, first, second):
    """Silent before: a rerun on other data (or another subset of it) into the same
    --output_dir resumed the first data set's heads and printed their result."""
    if "fashion_mnist" in second and needs_fashion_mnist.args[0]:
        pytest.skip(needs_fashion_mnist.kwargs["reason"])
    out = tmp_path / "probe"

    def argv(data, epochs):
        data_path, *subset = data.split()
        data_path = str(world / data_path) if data_path.startswith("data_") else data_path
        return ["--pretrained_weights", world / "good.pth", "--data_path", data_path, "--output_dir", out,
                "--train_subset", "12", "--test_subset", "8", *subset, *LINEAR[:1], str(epochs), *LINEAR[2:]]

    eval_linear.main([str(a) for a in argv(first, 1)])
    status, _, stderr = run_main_in_process(eval_linear, argv(second, 2), capsys)
    assert_one_error_line(status, stderr, "trained on other data")
    results = eval_linear.main([str(a) for a in argv(first, 2)])  # its own heads still resume
    assert "Resuming from" in capsys.readouterr().out and results["epochs"] == 2


def test_linear_probe_locks_its_output_dir(world, tmp_path, capsys, monkeypatch):
    """Two probes started together in one folder resumed each other's heads; now the second
    is refused while the first holds the folder."""
    out = tmp_path / "probe"
    out.mkdir()
    monkeypatch.setattr(run_folder, "LOCK_WAIT_S", 0.0)
    with open(out / run_folder.LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("another probe, pid 1\n")
        held.flush()
        status, _, stderr = run_main_in_process(eval_linear, ["--pretrained_weights", world / "good.pth",
                                                              "--data_path", world / "data_a",
                                                              "--output_dir", out, *LINEAR], capsys)
    assert_one_error_line(status, stderr, "is in use by another probe")
    assert not (out / eval_linear.CHECKPOINT_NAME).exists()


# -------------------------------------------------------------------------- export
def test_export_refuses_a_nan_model_and_keeps_the_previous_export(world, tmp_path, capsys):
    out = tmp_path / "export"
    export.main(["--pretrained_weights", str(world / "good.pth"), "--output_dir", str(out)])
    before = digest(out)
    capsys.readouterr()
    status, stdout, stderr = run_main_in_process(
        export, ["--pretrained_weights", world / "all_nan.pth", "--output_dir", out], capsys)
    assert "identical" not in stdout
    assert_one_error_line(status, stderr, "non-finite features")
    assert digest(out) == before


@pytest.mark.parametrize("renames_done", [0, 1, 2])
def test_export_killed_mid_way_never_leaves_a_config_json_describing_other_weights(world, tmp_path,
                                                                                     monkeypatch, renames_done):
    """A re-export of another model killed after `renames_done` of its renames: each weight
    file then loads with a config.json that describes it, or is refused with one line."""
    out = tmp_path / "export"
    export.main(["--pretrained_weights", str(world / "good.pth"), "--output_dir", str(out)])
    real_os_replace, done = os.replace, []

    def killed(target_dir):
        def rename(source, target):
            if Path(target).parent == out and not Path(target).name.startswith("."):
                if len(done) == renames_done:
                    raise KeyboardInterrupt  # kill -9 stands still here; nothing after runs
                done.append(target)
            return real_os_replace(source, target)
        return rename

    monkeypatch.setattr(os, "replace", killed(out))  # Path.replace calls it too
    with pytest.raises(KeyboardInterrupt):
        export.main(["--pretrained_weights", str(world / "global_norm.pth"), "--output_dir", str(out)])
    monkeypatch.setattr(os, "replace", real_os_replace)
    described = json.loads((out / "config.json").read_text())["model_config"]
    for name in ("model.safetensors", "backbone.pth"):
        try:
            _, config = weight_files.load_backbone(str(out / name))
        except errors.UserError as error:
            assert "does not describe" in str(error) or name == "backbone.pth", str(error)
            continue
        if name == "model.safetensors":
            assert config == described, f"{name} loaded with a config.json of another model"


# --------------------------------------------------------------- visualize, embed
def test_visualize_gives_every_image_its_own_grid(world, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = ["cat.jpg", "cat.png", "a b.png", "a_b.png", "ä.png", "ö.png"]
    rng = np.random.default_rng(3)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / name)
    out = tmp_path / "grids"
    visualize_slots.main(["--pretrained_weights", str(world / "good.pth"), "--image_path", str(images),
                          "--output_dir", str(out), "--display_size", "32"])
    assert len(list(out.glob("*.png"))) == len(names)


def test_embed_refuses_a_file_name_with_a_line_break_for_the_names_file(world, tmp_path, capsys):
    images = tmp_path / "images"
    save_images(images, 3, seed=4)
    (images / "1.png").rename(images / "one\nline.png")
    status, _, stderr = run_main_in_process(embed, ["--pretrained_weights", world / "good.pth", "--data_path",
                                                    images, "--output", tmp_path / "e.npy", "--num_workers", "0"],
                                            capsys)
    assert_one_error_line(status, stderr, "line break")
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "e.txt").exists()
    embed.main(["--pretrained_weights", str(world / "good.pth"), "--data_path", str(images),
                "--output", str(tmp_path / "e.pt"), "--num_workers", "0"])  # a list holds any name
    assert "one\nline.png" in torch.load(tmp_path / "e.pt", weights_only=True)["names"]


# ------------------------------------------------------------------------ plot_runs
def test_plot_runs_writes_the_file_it_names(tmp_path, capsys):
    run = training_log(tmp_path / "run")
    plot_runs.main([str(run), "--output", str(tmp_path / "runs")])
    assert f"Wrote {tmp_path / 'runs'}" in capsys.readouterr().out
    assert (tmp_path / "runs").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "runs.png").exists()


def test_plot_runs_side_files(tmp_path, capsys):
    """A damaged knn_baselines.json only loses its figures; a damaged config.yaml or log line
    is one error line."""
    run = training_log(tmp_path / "run")
    (run / "knn_baselines.json").write_text('{"untrained": {"knn_top1": "high"}')
    plot_runs.main([str(run), "--output", str(tmp_path / "a.png")])
    assert (tmp_path / "a.png").is_file() and "knn_baselines.json left out" in capsys.readouterr().err
    (run / "config.yaml").write_text("readout: [sparo\n")
    status, _, stderr = run_main_in_process(plot_runs, [run, "--output", tmp_path / "b.png"], capsys)
    assert_one_error_line(status, stderr, "config.yaml")
    (run / "config.yaml").unlink()
    with open(run / "log.txt", "a") as log:
        log.write("7\n")
    status, _, stderr = run_main_in_process(plot_runs, [run, "--output", tmp_path / "c.png"], capsys)
    assert_one_error_line(status, stderr, "log.txt")


def test_training_summary_survives_a_corrupt_baselines_file(tmp_path, capsys):
    """A finished run's closing summary read knn_baselines.json; a damaged one made it exit 1."""
    (tmp_path / run_folder.KNN_BASELINES).write_text("[1, 2")
    line = knn_monitor.summary(tmp_path, [dict(epoch=0, knn_top1=50.0)])
    assert "epoch 0 50.00" in line and "left out" in capsys.readouterr().err


# ------------------------------------------------------------------------ images
def test_decompression_bomb_is_an_unreadable_image(tmp_path, monkeypatch, capsys):
    """Training skips it like any unreadable image; evaluation names it in one line."""
    root = image_set(tmp_path / "data", seed=9)
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(root / "train" / "a" / "bomb.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is above twice that: an error
    pretrain = datasets.build_dataset(str(root / "train"), "pretrain", lazy=True)
    served = [pretrain[i] for i in range(len(pretrain))]
    assert len(served) == 13 and "skipping unreadable image" in capsys.readouterr().err
    evaluation = datasets.build_dataset(str(root), "train")
    bomb = [i for i, (path, _) in enumerate(evaluation.dataset.samples) if path.endswith("bomb.png")][0]
    with pytest.raises(errors.UserError, match="bomb.png"):
        evaluation[bomb]


# ---------------------------------------------------------------------- YAML flags
def test_yaml_null_means_the_flags_default(world):
    parser = eval_knn.argparse.ArgumentParser("k-NN", parents=[eval_knn.get_args_parser()])
    args = config_files.parse_args_with_config(parser, ["--config", str(world / "null.yaml")])
    assert args.nb_knn == [10, 20, 100, 200] and args.temperature == 0.07


def test_corrupt_config_yaml_on_resume_is_one_error(tmp_path):
    parser = main_dino_sparo.get_args_parser()
    args = parser.parse_args(["--output_dir", str(tmp_path)])
    for text in ("epochs: [1\n", "- a list\n", "1: 2\n"):
        (tmp_path / run_folder.CONFIG).write_text(text)
        with pytest.raises(errors.UserError, match="config.yaml"):
            run_folder.record_start(args, tmp_path, parser, start_epoch=1)


# ----------------------------------------------------------------------- resources
def test_sizes_from_input_are_bounded_before_allocating():
    parser = main_dino_sparo.get_args_parser()
    args = parser.parse_args(["--epochs", "1000000000"])
    with pytest.raises(errors.UserError, match="--epochs 1000000000"):
        main_dino_sparo.check_args(args)
    with pytest.raises(errors.UserError, match="steps"):
        utils.cosine_scheduler(0.1, 0.0, 100_000, 10_000)


def test_error_lines_are_capped(capsys):
    with pytest.raises(SystemExit):
        errors.run_main(lambda: (_ for _ in ()).throw(errors.UserError("x" * 10**6)))
    assert len(capsys.readouterr().err) < 2500


# ------------------------------------------------------------------ unwritable outputs
def test_tensorboard_folder_that_is_a_file_or_read_only(tmp_path):
    (tmp_path / "tensorboard").write_text("a file")
    with pytest.raises(errors.UserError, match="--tensorboard false"):
        tensorboard_log.TrainingBoard(tmp_path, first_step=0)
    if os.geteuid() != 0:  # root writes into read-only folders
        other = tmp_path / "other"
        (other / "tensorboard").mkdir(parents=True)
        (other / "tensorboard").chmod(0o500)
        with pytest.raises(errors.UserError, match="not writable"):
            tensorboard_log.TrainingBoard(other, first_step=0)


def test_a_lock_file_that_cannot_be_removed_keeps_the_runs_own_outcome(tmp_path, monkeypatch):
    """An output folder that turned read-only during a run keeps its lock file, as after a
    kill -9: releasing the lock must neither replace the run's one-line error (or a finished
    run's success) with an OSError nor leave the folder locked."""
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    writable_unlink = os.unlink
    monkeypatch.setattr(run_folder, "LOCK_WAIT_S", 0.0)
    with pytest.raises(errors.UserError, match="checkpoint.pth"):
        with run_folder.locked(tmp_path):
            monkeypatch.setattr(os, "unlink", read_only)
            raise errors.UserError(f"cannot write {tmp_path / 'checkpoint.pth'}: Read-only file system")
    with run_folder.locked(tmp_path):  # a run that ends well, in the read-only folder
        pass
    monkeypatch.setattr(os, "unlink", writable_unlink)
    with run_folder.locked(tmp_path):  # released: the next run takes the folder at once
        pass
    assert not (tmp_path / run_folder.LOCK).exists()


@pytest.fixture
def full_disk(monkeypatch):
    """Every file opened for writing under the returned folder is /dev/full: writes fail with
    ENOSPC, as on a full disk (reads and other folders are untouched)."""
    real_open = builtins.open
    folders = []

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and any(c in mode for c in "wax+") and \
                not str(file).endswith(run_folder.LOCK) and \
                any(str(Path(file).absolute()).startswith(str(f)) for f in folders):
            return real_open("/dev/full", mode.replace("x", "w").replace("a", "w"), *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    monkeypatch.setattr(io, "open", open_on_full_disk)
    return folders


def test_full_disk_is_one_line_and_keeps_the_previous_results(world, tmp_path, capsys, full_disk):
    out = tmp_path / "out"
    eval_knn.main([str(a) for a in ["--pretrained_weights", world / "good.pth", "--data_path", world / "data_a",
                                    "--output_json", out / "knn.json", *knn(world)]])
    eval_linear.main([str(a) for a in ["--pretrained_weights", world / "good.pth", "--data_path", world / "data_a",
                                       "--output_dir", out / "probe", *LINEAR]])
    before = digest(out)
    full_disk.append(out)
    runs = [
        (eval_knn, ["--pretrained_weights", world / "good.pth", "--data_path", world / "data_a",
                    "--output_json", out / "knn.json", *knn(world)], "knn.json"),
        (eval_linear, ["--pretrained_weights", world / "good.pth", "--data_path", world / "data_a",
                       "--output_dir", out / "probe", *LINEAR[:1], "2", *LINEAR[2:]], "linear_checkpoint.pth"),
        (embed, ["--pretrained_weights", world / "good.pth", "--data_path", world / "data_a",
                 "--output", out / "e.npy", "--num_workers", "0"], "cannot write"),
        (export, ["--pretrained_weights", world / "good.pth", "--output_dir", out / "export"],
         "cannot write the export"),
    ]
    for module, argv, words in runs:
        status, _, stderr = run_main_in_process(module, argv, capsys)
        assert_one_error_line(status, stderr, words)
    assert {k: v for k, v in digest(out).items() if not k.startswith("probe/training.lock")} == before


# -------------------------------------------------------------------- submitit
def test_failed_job_line_is_clean(tmp_path, capsys):
    """A job that raises: its traceback comes from its log; the launcher's own line is clean
    (it used to end in `(  - PATH)`)."""
    executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="local")
    executor.update_parameters(timeout_min=1)
    job = executor.submit(int, "not a number")
    with pytest.raises(errors.UserError) as refused:
        run_with_submitit.wait_for(job, poll_s=0.2)
    message = str(refused.value)
    assert message.startswith(f"job {job.job_id} failed") and "  - " not in message and "\n" not in message


def test_bad_input_found_inside_a_job_is_one_line(world, tmp_path, capsys, monkeypatch):
    """The job meets the bad input (weights giving NaN features) after it was submitted: the
    job's log and the launcher each end in that one line, without a traceback."""
    # A job without a result: submitit waits this long for one to appear (15 s, for slow
    # shared file systems); a local job's folder is local.
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 1)
    status, _, stderr = run_main_in_process(run_with_submitit, [
        "--job", "knn", "--cluster", "local", "--ngpus", "0", "--nodes", "1", "--shared_dir", tmp_path,
        "--pretrained_weights", world / "all_nan.pth", "--data_path", world / "data_a", "--nb_knn", "1",
        "--num_workers", "0"], capsys)
    assert_one_error_line(status, stderr, "stopped: ")
    assert "not finite" in stderr.splitlines()[-1]


def test_resume_refuses_a_damaged_model_config(tmp_path):
    for damaged in ([1, 2], "vit_small"):
        with pytest.raises(errors.UserError, match="not a mapping"):
            main_dino_sparo.check_resume_compatible({"model_config": damaged}, {"arch": "vit_nano"}, {},
                                                    tmp_path / "checkpoint.pth")


def test_checkpoint_writers_on_a_full_disk_keep_the_previous_file(tmp_path, full_disk):
    """Training's writers (checkpoint.pth via atomic_save, config.yaml via atomic_write_text,
    log lines): a full disk is one UserError naming the file; the previous file is intact
    (training's error used to be `inline_container.cc:672 unexpected pos`)."""
    utils.atomic_save({"epoch": 1, "w": torch.ones(3)}, tmp_path / "checkpoint.pth")
    utils.atomic_write_text(tmp_path / "config.yaml", "epochs: 1\n")
    before = digest(tmp_path)
    full_disk.append(tmp_path)
    with pytest.raises(errors.UserError, match="cannot write .*checkpoint.pth: No space left on device"):
        utils.atomic_save({"epoch": 2, "w": torch.zeros(10**5)}, tmp_path / "checkpoint.pth")
    with pytest.raises(errors.UserError, match="cannot write .*config.yaml: No space left"):
        utils.atomic_write_text(tmp_path / "config.yaml", "epochs: 2\n")
    with pytest.raises(errors.UserError, match="cannot write .*log.txt"):
        utils.write_json_line(tmp_path / "log.txt", {"epoch": 2})
    full_disk.clear()
    assert {k: v for k, v in digest(tmp_path).items() if k != "log.txt"} == before
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_timm_refuses_a_file_whose_image_size_does_not_fit_before_allocating(tmp_path):
    """timm.create_model(..., pretrained_cfg_overlay=dict(file=...)) reads model_config from the
    file; a 4-million-pixel image size there would allocate a position table of 10^11 entries.
    The shapes are compared on the meta device first: a ValueError naming the file."""
    import timm
    import timm_models  # noqa: F401  (registers the names)
    config = dict(arch="vit_nano", patch_size=7, img_size=28, readout="sparo")
    path = save_checkpoint(tmp_path / "huge.pth", config=config, edit=damaged_config(img_size=4 * 10**6))
    with pytest.raises(ValueError, match="huge.pth does not fit .*shape mismatch"):
        timm.create_model("vit_nano_patch7_28_sparo", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    good = save_checkpoint(tmp_path / "good.pth", config=config)  # the check lets a fitting file through
    model = timm.create_model("vit_nano_patch7_28_sparo", pretrained=True, pretrained_cfg_overlay=dict(file=str(good)))
    assert model.pos_embed.shape[1] == 17
