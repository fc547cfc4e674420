"""Bad input to the evaluation and visualisation scripts (issue 7): one clear line on stderr,
exit status 2, no traceback, and no existing file touched.

Each script gets the same table of hostile inputs (data folders, images, checkpoints, flags,
output paths). The cases run in this process through errors.run_main, the exact wrapper the
command line uses, so the test sees the real exit status and stderr without paying for an
interpreter start-up per case; one case per script also runs as a real subprocess.
main_dino_sparo.py's own table is in test_reliability_training.py, the launcher's in
test_submitit.py.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import errors
import eval_knn
import eval_linear
import slot_gallery
import visualize_slots
from helpers import Payload, run_script

SCRIPTS = {"eval_knn": eval_knn, "eval_linear": eval_linear, "slot_gallery": slot_gallery,
           "visualize_slots": visualize_slots}


# ------------------------------------------------------------------------------ fixtures
def save_images(folder: Path, count: int = 3, size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sparo_checkpoint):
    """Every hostile file once; tests only read them."""
    root = tmp_path_factory.mktemp("bad_input")
    good = root / "good"
    for split in ("train", "val"):
        for label in ("a", "b"):
            save_images(good / split / label)
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "val").mkdir(parents=True)
    save_images(root / "no_val" / "train" / "a")
    for split in ("train", "val"):
        (root / "text" / split / "a").mkdir(parents=True)
        (root / "text" / split / "a" / "notes.txt").write_text("not an image")
    for split in ("train", "val"):
        save_images(root / "broken" / split / "a")
    (root / "broken" / "val" / "a" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")

    full = tiny_sparo_checkpoint.read_bytes()
    (root / "truncated.pth").write_bytes(full[: len(full) // 3])
    torch.save({"teacher": Payload(root / "payload_ran"), "epoch": 1}, root / "hostile.pth")
    state = torch.load(tiny_sparo_checkpoint, map_location="cpu", weights_only=True)
    state["model_config"] = {**state["model_config"], "arch": "vit_small"}
    torch.save(state, root / "other_arch.pth")
    (root / "a_file").write_text("outputs cannot go under a file")
    for split in ("train", "val"):  # a val/ class that train/ lacks
        save_images(root / "extra_val" / split / "a")
    save_images(root / "extra_val" / "val" / "zebra")
    (root / "list.yaml").write_text("batch_size_per_gpu: [1, 2]\n")

    state = torch.load(tiny_sparo_checkpoint, map_location="cpu", weights_only=True)
    teacher = {**state["teacher"]}
    teacher["backbone.pos_embed"] = torch.full_like(teacher["backbone.pos_embed"], float("nan"))
    torch.save({**state, "teacher": teacher}, root / "nan_weights.pth")
    # Another backbone that the old check (the sum of |w|) took for the same one.
    teacher = {**state["teacher"]}
    teacher["backbone.patch_embed.proj.weight"] = -teacher["backbone.patch_embed.proj.weight"]
    torch.save({**state, "teacher": teacher}, root / "sign_flipped.pth")
    eval_linear.main([str(a) for a in ["--pretrained_weights", tiny_sparo_checkpoint, "--data_path", good,
                                       "--output_dir", root / "probe_a", "--epochs", "1"]])
    return root


def run_main_in_process(module, argv, capsys):
    """Run module.main(argv) the way the command line does; return (exit status, stderr)."""
    with pytest.raises(SystemExit) as stopped:
        errors.run_main(lambda: module.main([str(a) for a in argv]))
    return stopped.value.code, capsys.readouterr().err


def digest(folder: Path):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- the table
def common_cases(w: Path, ckpt: Path):
    """(name, argv for eval_knn/eval_linear/slot_gallery, expected message)."""
    weights = ["--pretrained_weights", ckpt]
    return [
        ("missing data folder", weights + ["--data_path", w / "nowhere"], "does not exist"),
        ("empty data folder", weights + ["--data_path", w / "empty"], "holds no images"),
        ("no val split", weights + ["--data_path", w / "no_val"], "val"),
        ("non-image files", weights + ["--data_path", w / "text"], "holds no images"),
        ("unreadable image", weights + ["--data_path", w / "broken"], "torn.png"),
        ("missing checkpoint", ["--pretrained_weights", w / "none.pth", "--data_path", w / "good"],
         "does not exist"),
        ("truncated checkpoint", ["--pretrained_weights", w / "truncated.pth", "--data_path", w / "good"],
         "truncated.pth"),
        ("hostile pickle", ["--pretrained_weights", w / "hostile.pth", "--data_path", w / "good"],
         "refused by safe loading"),
        ("other architecture", ["--pretrained_weights", w / "other_arch.pth", "--data_path", w / "good"],
         "vit_small"),
        ("arch flag disagrees", weights + ["--data_path", w / "good", "--arch", "vit_base"], "vit_base"),
        ("slot out of range", weights + ["--data_path", w / "good", "--slots", "0,16"],
         "--slots must name slots between 0 and 15"),
        ("image size not a multiple of the patch", weights + ["--data_path", w / "good", "--img_size", "18"],
         "multiple"),
        ("val class absent from train", weights + ["--data_path", w / "extra_val"],
         "has classes that the training split lacks: zebra"),
        ("weights that give NaN features", ["--pretrained_weights", w / "nan_weights.pth", "--data_path", w / "good"],
         "not finite"),
        ("negative number of workers", weights + ["--data_path", w / "good", "--num_workers", "-1"],
         "--num_workers: must be 0 or more"),
        ("YAML list for a one-value flag", weights + ["--data_path", w / "good", "--config", w / "list.yaml"],
         "--batch_size_per_gpu takes one value"),
    ]


# Flags every case of a script gets: outputs go to OUT (which already holds a previous result
# that must survive), and k fits the six training images of the small data sets.
BASE_FLAGS = {
    "eval_knn": lambda out: ["--nb_knn", "2", "--output_json", out / "previous.json"],
    "eval_linear": lambda out: ["--output_dir", out, "--output_json", out / "previous.json", "--epochs", "1"],
    "slot_gallery": lambda out: ["--nb_knn", "2", "--output_dir", out, "--output_json", out / "previous.json"],
    "visualize_slots": lambda out: ["--output_dir", out],
}


def script_cases(script: str, w: Path, ckpt: Path):
    weights = ["--pretrained_weights", ckpt, "--data_path", w / "good"]
    extra = {
        "eval_knn": [
            ("select more slots than L", weights + ["--select_slots", "17"], "--select_slots 17"),
            ("k larger than the bank", weights + ["--nb_knn", "50"], "--nb_knn 50 exceeds the 6 training images"),
            ("features dumped under a file", weights + ["--dump_features", w / "a_file" / "f"], "a_file"),
            ("json under a file", weights + ["--output_json", w / "a_file" / "r.json"], "a_file"),
            ("missing feature folder", ["--load_features", w / "nowhere"], "nowhere"),
        ],
        "eval_linear": [
            ("output under a file", weights + ["--output_dir", w / "a_file" / "o"], "a_file"),
            ("evaluate without a head", weights + ["--evaluate", "--output_dir", w / "fresh_linear"],
             "linear"),
            ("more labels than the head", weights + ["--num_labels", "1"], "num_labels"),
            ("learning rate nan", weights + ["--lr", "nan"], "--lr: must be a positive number"),
            ("resume another backbone's probe",
             ["--pretrained_weights", w / "sign_flipped.pth", "--data_path", w / "good",
              "--output_dir", w / "probe_a", "--epochs", "2"], "trained on another backbone"),
        ],
        "slot_gallery": [
            ("output under a file", weights + ["--output_dir", w / "a_file" / "o"], "a_file"),
            ("top_k above L", weights + ["--top_k", "17"], "--top_k 17 exceeds the 16 slots"),
        ],
    }
    return [(name, argv, message) for name, argv, message in common_cases(w, ckpt) + extra[script]]


def visualize_cases(w: Path, ckpt: Path):
    image = w / "good" / "val" / "a" / "0.png"
    weights = ["--pretrained_weights", ckpt]
    return [
        ("missing image", weights + ["--image_path", w / "nowhere.png"], "does not exist"),
        ("unreadable image", weights + ["--image_path", w / "broken" / "val" / "a" / "torn.png"], "torn.png"),
        ("truncated checkpoint", ["--pretrained_weights", w / "truncated.pth", "--image_path", image],
         "truncated.pth"),
        ("hostile pickle", ["--pretrained_weights", w / "hostile.pth", "--image_path", image],
         "refused by safe loading"),
        ("other architecture", ["--pretrained_weights", w / "other_arch.pth", "--image_path", image], "vit_small"),
        ("top_k above L", weights + ["--image_path", image, "--top_k", "17"], "--top_k 17 exceeds the 16 slots"),
        ("output under a file", weights + ["--image_path", image, "--output_dir", w / "a_file" / "o"], "a_file"),
    ]


def all_cases():
    """Case ids are built before the fixture exists; the argv is built inside the test."""
    ids = []
    for script in ("eval_knn", "eval_linear", "slot_gallery"):
        ids += [(script, i) for i in range(len(script_cases(script, Path("w"), Path("c"))))]
    ids += [("visualize_slots", i) for i in range(len(visualize_cases(Path("w"), Path("c"))))]
    return ids


def case_for(script, index, w, ckpt):
    cases = visualize_cases(w, ckpt) if script == "visualize_slots" else script_cases(script, w, ckpt)
    return cases[index]


def case_id(param):
    script, index = param
    return f"{script}-{case_for(script, index, Path('w'), Path('c'))[0].replace(' ', '_')}"


@pytest.mark.parametrize("script,index", all_cases(), ids=[case_id(p) for p in all_cases()])
def test_bad_input_gives_one_clear_line_and_touches_nothing(world, tiny_sparo_checkpoint, capsys, tmp_path,
                                                            script, index):
    name, argv, message = case_for(script, index, world, tiny_sparo_checkpoint)
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.json").write_text('{"top1": 99.9}\n')
    before = {**digest(world), **{f"out/{k}": v for k, v in digest(out).items()}}
    status, stderr = run_main_in_process(SCRIPTS[script], BASE_FLAGS[script](out) + argv, capsys)
    after = {**digest(world), **{f"out/{k}": v for k, v in digest(out).items()}}
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert status == 2, f"{name}: exit status {status}\n{stderr}"
    assert message in stderr, f"{name}: {stderr}"
    assert lines and lines[-1].startswith(("error:", f"{script}.py: error:", f"{script}: error:")), stderr
    assert "Traceback" not in stderr
    assert {k: after.get(k) for k in before} == before, f"{name} changed an existing file"
    assert not (world / "payload_ran").exists()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_command_line_prints_one_line_without_traceback(world, tiny_sparo_checkpoint, script):
    """A real process per script: the hostile pickle is refused with one line, exit status 2."""
    if script == "visualize_slots":
        argv = ["--pretrained_weights", world / "hostile.pth", "--image_path", world / "good" / "val" / "a" / "0.png"]
    else:
        argv = ["--pretrained_weights", world / "hostile.pth", "--data_path", world / "good"]
    result = run_script(f"{script}.py", *argv, "--output_dir" if script != "eval_knn" else "--nb_knn",
                        world / "out" if script != "eval_knn" else 1, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "refused by safe loading" in lines[0], result.stderr
    assert not (world / "payload_ran").exists()


# ---------------------------------------------- val classes: a subset of train's (issue 24)
@pytest.fixture(scope="module")
def subset_val(tmp_path_factory):
    """train/ holds classes a, b, c; val/ only b and c, its images copies of train's, so a
    1-NN classifier or a probe that fits its training images is right on every val image;
    with val's classes numbered on their own (b=0, c=1) it would be wrong on every one."""
    root = tmp_path_factory.mktemp("subset_val")
    rng = np.random.default_rng(1)
    for label in ("a", "b", "c"):
        for i in range(2):
            image = Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8))
            (root / "train" / label).mkdir(parents=True, exist_ok=True)
            image.save(root / "train" / label / f"{i}.png")
            if label != "a":
                (root / "val" / label).mkdir(parents=True, exist_ok=True)
                image.save(root / "val" / label / f"{i}.png")
    return root


def test_val_with_a_subset_of_classes_keeps_the_training_labels(subset_val):
    assert list(datasets.dataset_labels(datasets.build_dataset(str(subset_val), "test"))) == [1, 1, 2, 2]
    assert list(datasets.dataset_labels(datasets.build_dataset(str(subset_val), "train"))) == [0, 0, 1, 1, 2, 2]


def test_knn_and_linear_score_a_val_subset_of_classes_correctly(subset_val, tiny_sparo_checkpoint, tmp_path):
    weights = ["--pretrained_weights", str(tiny_sparo_checkpoint), "--data_path", str(subset_val)]
    eval_knn.main(weights + ["--nb_knn", "1", "--output_json", str(tmp_path / "knn.json")])
    assert json.loads((tmp_path / "knn.json").read_text())["knn"]["1"]["top1"] == 100.0
    eval_linear.main(weights + ["--train_augmentation", "none", "--cache_features", "true", "--epochs", "100",
                                "--lr", "10", "--output_dir", str(tmp_path / "linear"),
                                "--output_json", str(tmp_path / "linear.json")])
    assert json.loads((tmp_path / "linear.json").read_text())["last"]["acc1"] == 100.0
