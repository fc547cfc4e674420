"""bench/quality.py's pipeline at a tiny size: real pre-training and evaluation subprocesses on
Fashion-MNIST, results checked against computations written here."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import weight_files
from helpers import REPO, needs_fashion_mnist, run_script

pytestmark = needs_fashion_mnist

BANK, TEST, K = 120, 60, 3
TINY = ["--quick", "--pretrain_subset", "64", "--epochs", "1", "--bank_size", str(BANK),
        "--test_size", str(TEST), "--select_slots", "1", str(K), "--untrained", "false"]
TINY_TRAIN = ["--train_args", "--batch_size_per_gpu", "32", "--local_crops_number", "1",
              "--out_dim", "64", "--print_freq", "1"]


def weighted_knn_top1(bank, bank_labels, test, test_labels, k=20, temperature=0.07):
    """DINO's weighted k-NN vote, brute force in float64 numpy (cosine similarity)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ bank.T
    correct = 0
    for row, label in zip(sims, test_labels):
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(int(bank_labels.max()) + 1)
        np.add.at(votes, bank_labels[nearest], np.exp(row[nearest] / temperature))
        correct += int(np.argmax(votes) == label)
    return 100.0 * correct / len(test_labels)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    linear = out / "linear.yaml"
    linear.write_text("epochs: 3\nbatch_size_per_gpu: 32\ncache_features: true\n"
                      "train_augmentation: none\nval_freq: 3\nlr_grid: [0.1, 1.0]\n")
    args = ["bench/quality.py", *TINY, "--output_dir", out, "--linear_config", linear, *TINY_TRAIN]
    run_script(*args, timeout=600)
    return out, json.loads((out / "results.json").read_text()), args


def test_table_has_every_variant_on_the_official_test_split(quick_run):
    out, results, _ = quick_run
    assert list(results["variants"]) == ["cls", "gap", "cls_proj", "sparo"]
    for row in results["variants"].values():
        assert 0 <= row["knn20"]["mean"] <= 100 and 0 <= row["linear"]["mean"] <= 100
        assert row["seeds"] == [0] and len(row["probes"]) == 1
    # each network's probe came from eval_linear's grid, chosen on held-out training images
    for name, row in results["variants"].items():
        linear = row["runs"]["0"]["linear"]["result"]
        assert [r["lr"] for r in linear["grid"]][:2] == [0.1, 1.0]
        assert linear["head"]["holdout_fraction"] == 0.1
        assert row["linear"]["values"] == [linear["last"]["acc1"]]
        assert row["probes"][0].startswith(f"{linear['chosen']['lr']:g}")
    assert set(results["difference_to_cls"]) == {"gap", "cls_proj", "sparo"}
    assert results["difference_to_cls"]["sparo"]["knn20"] == pytest.approx(
        results["variants"]["sparo"]["knn20"]["mean"] - results["variants"]["cls"]["knn20"]["mean"])
    assert "official test split, images 0..59" in results["setup"]["evaluation"]
    table = (out / "results.md").read_text()
    assert "CLS read-out" in table and "SPARO, L=64, V=64" in table and "(gap)" in table
    # pre-training time is the epochs' time from the run's log (it survives a resume)
    run = results["variants"]["sparo"]["runs"]["0"]["pretrain"]
    assert run["training_seconds"] == pytest.approx(sum(e["epoch_seconds"] for e in run["train_log"]))
    assert 0 < run["training_seconds"] <= run["seconds"]
    assert results["variants"]["sparo"]["pretrain_seconds"] == [run["training_seconds"]]
    # the dumped features are the bank (first training images) and the official test images,
    # in data set order
    features = next((out / "eval").glob("*/sparo_seed0/features"))
    _, train_labels = datasets.load_fashion_mnist("train")
    _, test_labels = datasets.load_fashion_mnist("test")
    load = lambda name: torch.load(features / name, weights_only=True)  # noqa: E731
    assert torch.equal(load("trainlabels.pth"), torch.as_tensor(train_labels[:BANK].astype(np.int64)))
    assert torch.equal(load("testlabels.pth"), torch.as_tensor(test_labels[:TEST].astype(np.int64)))
    assert not (out / "eval" / "fmnist_bank120_test60" / "cls_seed0" / "features").exists()


def test_heldout_images_are_exported_once_with_their_labels(tmp_path):
    from PIL import Image
    from bench import quality

    data = quality.evaluation_data(tmp_path, 30, "heldout", 12)
    folder = Path(data.data_path)
    assert data.flags == [] and data.name == folder.name
    images, labels = datasets.load_fashion_mnist("train")
    for split, index in (("train", range(30)), ("val", range(50000, 50012))):
        files = sorted((folder / split).rglob("*.png"))
        assert sorted(int(f.stem) for f in files) == list(index)
        for f in files:
            assert int(f.parent.name) == labels[int(f.stem)]
            assert np.array_equal(np.asarray(Image.open(f)), images[int(f.stem)])
    stamp = (folder / "done.json").stat().st_mtime
    assert quality.evaluation_data(tmp_path, 30, "heldout", 12).data_path == str(folder)
    assert (folder / "done.json").stat().st_mtime == stamp  # not written again
    official = quality.evaluation_data(tmp_path, 30, "test", 12)
    assert official.args() == ["--data_path", "fashion_mnist", "--train_subset", "30", "--test_subset", "12"]


def test_raw_pixel_floor_equals_brute_force(quick_run):
    _, results, _ = quick_run
    train_images, train_labels = datasets.load_fashion_mnist("train")
    test_images, test_labels = datasets.load_fashion_mnist("test")
    flat = lambda x: x.reshape(len(x), -1).astype(np.float64)  # noqa: E731
    expected = weighted_knn_top1(flat(train_images[:BANK]), train_labels[:BANK],
                                 flat(test_images[:TEST]), test_labels[:TEST])
    assert results["raw_pixels"]["same_bank"]["top1"] == pytest.approx(expected, abs=1e-9)
    assert results["raw_pixels"]["full_bank"]["bank_size"] == 60000


def test_reported_accuracies_equal_brute_force_on_the_features(quick_run):
    out, results, _ = quick_run
    features = next((out / "eval").glob("*/sparo_seed0/features"))
    load = lambda name: torch.load(features / name, weights_only=True).double().numpy()  # noqa: E731
    bank, test = load("trainfeat.pth"), load("testfeat.pth")
    bank_labels, test_labels = load("trainlabels.pth").astype(int), load("testlabels.pth").astype(int)
    assert results["variants"]["sparo"]["knn20"]["mean"] == pytest.approx(
        weighted_knn_top1(bank, bank_labels, test, test_labels), abs=1e-6)

    # slot subsets: the kept 64-wide slots, the vector renormalised (cosine on those slots)
    selection = results["slot_selection"]["0"]
    assert len(selection["order"]) == K and len(set(selection["order"])) == K
    slots = lambda x, s: x.reshape(len(x), 64, 64)[:, s].reshape(len(x), -1)  # noqa: E731
    for k, row in selection["by_k"].items():
        chosen = row["slots"]
        assert chosen == selection["order"][:int(k)]
        assert row["greedy"] == pytest.approx(weighted_knn_top1(
            slots(bank, chosen), bank_labels, slots(test, chosen), test_labels), abs=1e-6)
        first = list(range(int(k)))
        assert row["first_k"] == pytest.approx(weighted_knn_top1(
            slots(bank, first), bank_labels, slots(test, first), test_labels), abs=1e-6)


def test_rerun_resumes_without_new_work(quick_run):
    out, results, args = quick_run
    mtime = (out / "pretrain" / "sparo_seed0" / "checkpoint.pth").stat().st_mtime
    run_script(*args, timeout=120)
    again = json.loads((out / "results.json").read_text())
    assert again["variants"] == results["variants"]
    assert (out / "pretrain" / "sparo_seed0" / "checkpoint.pth").stat().st_mtime == mtime


def test_heldout_split_refuses_pretraining_on_held_out_images(tmp_path):
    process = run_script("bench/quality.py", "--eval_split", "heldout", "--pretrain_subset", "60000",
                         "--output_dir", tmp_path, check=False)
    assert process.returncode == 2
    assert "held-out images are never pre-trained on" in process.stderr


def test_untrained_networks_have_each_variants_architecture(tmp_path):
    """The untrained rows must be the very model each variant pre-trains, --train_args included."""
    from bench import quality
    import vision_transformer as vits

    recipe = str(quality.RECIPE)
    configs = {name: quality.variant_model_config(name, recipe) for name in quality.VARIANTS}
    assert configs["cls"]["readout"] == "cls" and configs["sparo"]["readout"] == "sparo"
    assert configs["gap"]["readout"] == "gap" and configs["cls_proj"]["readout"] == "cls_proj"
    assert (configs["cls_proj"]["sparo_slots"], configs["cls_proj"]["sparo_dim"]) == (64, 64)  # SPARO's width
    assert (configs["sparo"]["sparo_slots"], configs["sparo"]["sparo_dim"]) == (64, 64)
    assert (configs["sparo_L16_V256"]["sparo_slots"], configs["sparo_L16_V256"]["sparo_dim"]) == (16, 256)
    assert (configs["sparo_L128_V32"]["sparo_slots"], configs["sparo_L128_V32"]["sparo_dim"]) == (128, 32)
    assert configs["sparo_global"]["sparo_norm"] == "global"
    assert configs["sparo_keep_all"]["sparo_keep_all_blocks"] is True
    assert all(c["arch"] == "vit_nano" and c["patch_size"] == 7 and c["img_size"] == 28
               for c in configs.values())
    assert quality.variant_model_config("sparo", recipe, ["--sparo_slots", "8"])["sparo_slots"] == 8

    path = tmp_path / "untrained.pth"
    quality.save_untrained(path, configs["sparo_L16_V256"], seed=0)
    backbone, config = weight_files.load_backbone(str(path))
    assert config["sparo_slots"] == 16 and backbone.num_features == 16 * 256
    again = tmp_path / "again.pth"
    quality.save_untrained(again, configs["sparo_L16_V256"], seed=0)  # same seed, same network
    first, second = (torch.load(p, weights_only=True)["teacher"] for p in (path, again))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert isinstance(backbone, vits.VisionTransformer)


def test_table_shows_one_floor_row_when_the_bank_is_the_whole_split(tmp_path):
    from bench import quality

    def table(same_bank_size):
        results = dict(setup=dict(evaluation="e"), variants={}, seconds=60.0, raw_pixels=dict(
            same_bank=dict(bank_size=same_bank_size, top1=80.0),
            full_bank=dict(bank_size=60000, top1=84.59)))
        quality.write_tables(tmp_path, results)
        return [line for line in (tmp_path / "results.md").read_text().splitlines()
                if line.startswith("| raw pixels")]

    dashes = " - |" * 7
    assert table(60000) == ["| raw pixels, whole 60000-image bank | - | 84.59 |" + dashes]
    assert table(2000) == ["| raw pixels, same 2000-image bank | - | 80.00 |" + dashes,
                           "| raw pixels, whole 60000-image bank | - | 84.59 |" + dashes]


def test_seeds_per_variant_and_gains_over_the_untrained_network():
    from bench import quality
    import argparse

    args = argparse.Namespace(seeds=[0, 1, 2], control_seeds=2)
    assert quality.seeds_of(args, "cls") == quality.seeds_of(args, "sparo") == [0, 1, 2]
    assert quality.seeds_of(args, "gap") == quality.seeds_of(args, "cls_proj") == [0, 1]
    assert quality.seeds_of(args, "sparo_global") == [0]
    runs = {seed: dict(knn20=knn, linear_top1=lin, probe="1 4b", pretrain=dict(seconds=60.0))
            for seed, knn, lin in ((0, 70.0, 80.0), (1, 72.0, 83.0), (2, 71.0, 81.0))}
    row = quality.summarise("cls", [0, 1, 2], runs, dict(knn20=60.0, linear=75.0))
    assert row["knn20"]["mean"] == pytest.approx(71.0) and row["knn20"]["spread"] == pytest.approx(2.0)
    assert row["knn20_gain"]["values"] == [10.0, 12.0, 11.0]
    assert row["linear_gain"]["mean"] == pytest.approx(19 / 3) and row["linear_gain"]["spread"] == pytest.approx(3.0)
    assert quality.signed(row["linear_gain"]) == "+6.33 ± 1.50"
    step = dict(result=dict(chosen=dict(lr=0.5, n_last_blocks=1, avgpool=True)))
    assert quality.chosen_probe(step) == "0.5 1b+p"
    assert quality.chosen_probe(dict(result=dict(chosen=dict(lr=2.0, n_last_blocks=None, avgpool=None)))) == "2"
