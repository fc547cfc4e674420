"""Linear probe (eval_linear.py): DINO's CLS feature against the model's own outputs, real
learning on digits from a frozen backbone (images and cached features), resume, --evaluate
of the saved head, and refusals."""
import argparse
import contextlib
import io
import json
import re

import pytest
import torch

import errors
import eval_linear
import utils
import vision_transformer as vits
import weight_files
from helpers import cls_vit_tiny, read_log, run_script, run_two_gloo_ranks

ACCURACY_LINE = re.compile(r"Accuracy at epoch (\d+) of the network on the (\d+) test images: ([\d.]+)%")
CHANCE = 10.0  # digits: 10 balanced classes


def run_linear(*args):
    """eval_linear.py's main() in this process (no interpreter start-up); returns its stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        eval_linear.main([str(a) for a in args])
    return buffer.getvalue()


def accuracies(stdout):
    return [(int(e), int(n), float(a)) for e, n, a in ACCURACY_LINE.findall(stdout)]


def final_top1(stdout):
    return float(re.search(r"^Top-1 test accuracy: ([\d.]+)$", stdout, re.M).group(1))


def test_cls_feature_is_dinos_concatenation():
    """n last CLS tokens (+ mean patch token): the last CLS is the model's own output and the
    pooled part is the mean of its final patch tokens."""
    model = cls_vit_tiny()
    images = torch.randn(3, 3, 16, 16)
    config = dict(readout="cls", arch="vit_tiny")
    with torch.no_grad():
        features = eval_linear.frozen_features(model, images, config, 4, True, None)
        tokens = model.forward_tokens(images)
    assert features.shape == (3, 5 * 192) == (3, eval_linear.feature_dim(config, 4, True, None))
    torch.testing.assert_close(features[:, 3 * 192:4 * 192], tokens[:, 0])
    torch.testing.assert_close(features[:, 4 * 192:], tokens[:, 1:].mean(1))
    # block 8's CLS, computed by running the blocks by hand
    with torch.no_grad():
        x = model.prepare_tokens(images)
        for block in model.blocks[:9]:
            x = block(x)
    torch.testing.assert_close(features[:, :192], model.norm(x)[:, 0])


def test_sparo_feature_with_slots_is_the_rescaled_subset(tiny_sparo_checkpoint):
    model, config = weight_files.load_backbone(str(tiny_sparo_checkpoint))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        full = eval_linear.frozen_features(model.eval(), images, config, 4, False, None, False)
        subset = eval_linear.frozen_features(model, images, config, 4, False, [1, 7], False)
        scaled = eval_linear.frozen_features(model, images, config, 4, False, [1, 7])
        encoding = model(images)
    torch.testing.assert_close(full, encoding)
    assert subset.shape == (2, 2 * 16)
    torch.testing.assert_close(subset.norm(dim=1), torch.ones(2))
    expected = torch.cat([encoding[:, 16:32], encoding[:, 112:128]], 1) * (16 / 2) ** 0.5
    torch.testing.assert_close(subset, expected)
    torch.testing.assert_close(scaled, subset * 32 ** 0.5)  # coordinates of unit scale


def test_learns_digits_from_cached_features(tiny_sparo_checkpoint, tmp_path):
    stdout = run_linear("--pretrained_weights", tiny_sparo_checkpoint, "--data_path", "digits",
                        "--train_augmentation", "none", "--cache_features", "true", "--epochs", "20",
                        "--lr", "0.04", "--val_freq", "10", "--output_dir", tmp_path,
                        "--output_json", tmp_path / "result.json")
    lines = accuracies(stdout)
    assert [epoch for epoch, _, _ in lines] == [0, 10, 19]
    assert all(n == 360 for _, n, _ in lines)
    top1 = final_top1(stdout)
    assert top1 == max(a for _, _, a in lines) and top1 > 6 * CHANCE
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["top1"] == pytest.approx(top1, abs=0.05) and saved["head"]["num_labels"] == 10
    assert len(read_log(tmp_path / "linear_log.txt")) == 20


def test_learns_from_images_resumes_and_evaluates_its_head(tiny_sparo_checkpoint, tmp_path):
    """Images through the frozen backbone every epoch (no caching), a resumed third epoch,
    and --evaluate of the saved head."""
    common = ["--pretrained_weights", tiny_sparo_checkpoint, "--data_path", "digits",
              "--lr", "0.1", "--output_dir", tmp_path, "--val_freq", "5",
              "--train_augmentation", "none"]
    first = run_script("eval_linear.py", *common, "--epochs", "2").stdout
    # validation at epoch 0 and at the last epoch of the schedule
    assert [e for e, _, _ in accuracies(first)] == [0, 1]
    assert accuracies(first)[-1][2] > 4 * CHANCE
    second = run_linear(*common, "--epochs", "3")
    assert "Resuming from" in second and "at epoch 2" in second
    assert [e for e, _, _ in accuracies(second)] == [2]
    assert [r["epoch"] for r in read_log(tmp_path / "linear_log.txt")] == [0, 1, 2]
    last = accuracies(second)[-1][2]
    assert last > 4 * CHANCE

    evaluated = run_linear(*common, "--evaluate")
    assert f"Accuracy of the network on the 360 test images: {last:.1f}%" in evaluated
    assert "Epoch: [" not in evaluated  # no training

    # the head belongs to the teacher's features: the student's are refused
    with pytest.raises(errors.UserError, match="another backbone"):
        run_linear(*common, "--evaluate", "--checkpoint_key", "student")


@pytest.mark.parametrize("flags, message", [
    (["--cache_features", "true"], "--cache_features needs --train_augmentation none"),
    (["--num_labels", "5"], "--num_labels 5 is too small"),
    (["--slots", "0,99"], "between 0 and 15"),
])
def test_refusals(tiny_sparo_checkpoint, tmp_path, flags, message):
    with pytest.raises(errors.UserError, match=re.escape(message)):
        run_linear("--pretrained_weights", tiny_sparo_checkpoint, "--data_path", "digits",
                   "--output_dir", tmp_path, *flags)
    assert not (tmp_path / "linear_checkpoint.pth").exists()


def test_evaluate_without_a_saved_head_is_a_clear_error(tiny_sparo_checkpoint, tmp_path):
    with pytest.raises(errors.UserError, match="linear_checkpoint.pth does not exist"):
        run_linear("--pretrained_weights", tiny_sparo_checkpoint, "--data_path", "digits",
                   "--output_dir", tmp_path, "--evaluate")


def test_dino_training_augmentation_and_test_preprocessing():
    from PIL import Image
    from torchvision import transforms as T

    args = argparse.Namespace(train_augmentation="dino", resize_size=None)
    train, val = eval_linear.build_transforms(args, 28)
    kinds = [type(t) for t in train.transforms]
    assert kinds == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert train.transforms[0].size == (28, 28)
    assert [type(t) for t in val.transforms] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert val.transforms[0].size == 32  # DINO's 256/224 ratio
    image = Image.new("RGB", (8, 8), (200, 30, 90))
    assert train(image).shape == val(image).shape == (3, 28, 28)
    args.train_augmentation = "none"
    plain_train, _ = eval_linear.build_transforms(args, 28)
    assert [type(t) for t in plain_train.transforms] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]


def test_cosine_schedule_matches_torch_cosine_annealing():
    linear = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 7, eta_min=0)
    for epoch in range(7):
        assert eval_linear.cosine_lr(0.3, epoch, 7) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()


def _loss_check_on_a_rank(out):
    """Rank 1 alone has a NaN loss; each rank records whether it sees every loss finite."""
    from pathlib import Path

    args = argparse.Namespace(device="cpu", dist_url="env://")
    utils.init_distributed_mode(args)
    loss = torch.tensor(float("nan") if args.rank == 1 else 0.5)
    Path(out, f"rank{args.rank}.txt").write_text(str(eval_linear.finite_everywhere(loss)))
    utils.cleanup_distributed()


def test_a_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Multi-rank linear probe: the decision to stop is the same on all ranks (the others would
    otherwise wait in DDP's next all-reduce); in one process it is the loss's own."""
    assert eval_linear.finite_everywhere(torch.tensor(1.0))
    assert not eval_linear.finite_everywhere(torch.tensor(float("inf")))
    run_two_gloo_ranks(_loss_check_on_a_rank, str(tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]


# ------------------------------------------------------------------ learning-rate grid
GRID = ["--data_path", "digits", "--train_augmentation", "none", "--cache_features", "true",
        "--epochs", "6", "--val_freq", "6", "--batch_size_per_gpu", "64"]


@pytest.fixture(scope="module")
def untrained_cls_weights(tmp_path_factory):
    """A randomly initialised CLS backbone saved like a training checkpoint (its features
    are fixed random projections: enough for a linear probe to learn digits)."""
    config = vits.BackboneConfig("vit_tiny", 4, 16, readout="cls")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cls") / "untrained.pth"
    utils.atomic_save(dict(teacher=config.build().state_dict(), model_config=config.to_dict()), path)
    return path


def _cached_grid_on_a_rank(weights, out):
    """The cached-feature grid at batch 32 per rank; records what this rank holds."""
    import os
    from pathlib import Path

    held = {}
    prepare = eval_linear.prepare_data

    def recording(args, evaluation, to_features):
        data = prepare(args, evaluation, to_features)
        bank = data.batches.features
        held.update(rows=bank.shape[0], width=bank.shape[1], storage=bank.untyped_storage().nbytes(),
                    test_rows=data.test.shape[0], heldout_rows=data.heldout.shape[0])
        return data

    eval_linear.prepare_data = recording
    rank = os.environ["RANK"]
    results = eval_linear.main([str(a) for a in ("--pretrained_weights", weights, *GRID, "--batch_size_per_gpu", "32",
                                                "--lr_grid", "0.01", "0.05", "0.2", "--n_last_blocks", "1",
                                                "--output_dir", Path(out) / f"out{rank}", "--device", "cpu")])
    torch.save(dict(held, heldout_top1=[row["heldout_top1"] for row in results["grid"]],
                    chosen=results["chosen"], top1=results["top1"]), Path(out) / f"rank{rank}.pth")


@pytest.mark.slow
def test_cached_features_stay_sharded_and_two_ranks_equal_one(untrained_cls_weights, tmp_path):
    """--cache_features under torchrun: every rank keeps only its shard of the training, held-out
    and test features (ImageNet's would be ~21 GB per GPU), and 2 ranks x 32 images take the
    same steps as 1 process x 64: the same held-out accuracies, choice and test accuracy."""
    _, single = grid_result(untrained_cls_weights, tmp_path / "single", "--lr_grid", "0.01", "0.05", "0.2",
                            "--n_last_blocks", "1")
    run_two_gloo_ranks(_cached_grid_on_a_rank, str(untrained_cls_weights), str(tmp_path))
    heldout = 144  # of the 1437 digits (1293 train on)
    for rank in (0, 1):
        record = torch.load(tmp_path / f"rank{rank}.pth", weights_only=True)
        rows = len(range(rank, 1437, 2))
        assert record["rows"] == rows and record["storage"] == rows * record["width"] * 4
        assert record["test_rows"] == len(range(rank, 360, 2))
        assert heldout // 2 - 15 < record["heldout_rows"] < heldout // 2 + 15  # its own held-out rows
        assert record["heldout_top1"] == [row["heldout_top1"] for row in single["grid"]]
        assert record["chosen"] == single["chosen"] and record["top1"] == single["top1"]


def grid_result(weights, out, *flags):
    stdout = run_linear("--pretrained_weights", weights, *GRID, "--output_dir", out,
                        "--output_json", out / "result.json", *flags)
    return stdout, json.loads((out / "result.json").read_text())


def test_grid_chooses_on_heldout_training_images_and_equals_a_single_head(untrained_cls_weights, tmp_path):
    """The grid trains 3 lrs x DINO's 4 CLS variants in one pass; its chosen head's test
    accuracy and weights equal a single head trained alone at that lr on the same variant
    and the same training rows (up to float rounding: the grid's heads on one variant share
    one matrix product, whose sums may round differently; rates in the stable range keep
    that from growing)."""
    stdout, grid = grid_result(untrained_cls_weights, tmp_path / "grid", "--lr_grid", "0.01", "0.05", "0.2")
    assert len(grid["grid"]) == 12 and stdout.count("<- chosen") == 1
    variants = {(row["n_last_blocks"], row["avgpool"]) for row in grid["grid"]}
    assert variants == {(1, False), (1, True), (4, False), (4, True)}
    heldout = [row["heldout_top1"] for row in grid["grid"]]
    chosen = grid["chosen"]
    best = grid["grid"][heldout.index(max(heldout))]  # the first of the best, in grid order
    assert (chosen["lr"], chosen["n_last_blocks"], chosen["avgpool"]) == (best["lr"], best["n_last_blocks"], best["avgpool"])
    assert "Holding out 144 of the 1437 training images" in stdout

    _, single = grid_result(untrained_cls_weights, tmp_path / "single", "--lr", str(chosen["lr"]),
                            "--n_last_blocks", str(chosen["n_last_blocks"]),
                            "--avgpool_patchtokens", str(chosen["avgpool"]), "--holdout_fraction", "0.1")
    assert single["last"]["acc1"] == grid["last"]["acc1"] == grid["top1"]
    saved_grid = torch.load(tmp_path / "grid" / "linear_checkpoint.pth", weights_only=True)
    saved_single = torch.load(tmp_path / "single" / "linear_checkpoint.pth", weights_only=True)
    index = saved_grid["chosen"]
    for name in ("weight", "bias"):
        torch.testing.assert_close(saved_grid["state_dict"][f"heads.{index}.linear.{name}"],
                                   saved_single["state_dict"][f"heads.0.linear.{name}"], rtol=1e-4, atol=1e-5)


def test_heads_sharing_a_product_get_their_own_gradients():
    """One step of two heads on the same features equals each head's step alone."""
    torch.manual_seed(0)
    features, labels = torch.randn(32, 24), torch.randint(0, 5, (32,))
    specs = [eval_linear.ProbeSpec(0.1, 0, 24), eval_linear.ProbeSpec(0.5, 0, 24), eval_linear.ProbeSpec(0.5, 8, 24)]
    together = eval_linear.LinearProbes(specs, 5, seed=1)
    losses = eval_linear.head_losses(together(features), labels)
    losses.sum().backward()
    for index, spec in enumerate(specs):
        alone = eval_linear.LinearClassifier(spec.stop - spec.start, 5)
        alone.load_state_dict(eval_linear.LinearProbes([spec], 5, seed=1).heads[0].state_dict())
        loss = torch.nn.functional.cross_entropy(alone(features[:, spec.start:spec.stop]), labels)
        loss.backward()
        torch.testing.assert_close(losses[index], loss)
        torch.testing.assert_close(together.heads[index].linear.weight.grad, alone.linear.weight.grad)
        torch.testing.assert_close(together.heads[index].linear.bias.grad, alone.linear.bias.grad)
    assert [len(members) for _, _, members in together.runs] == [2, 1]


def test_the_choice_never_sees_the_test_labels(untrained_cls_weights, tmp_path, monkeypatch):
    """Scrambling the test labels changes the test accuracy, never the held-out figures or
    the head chosen from them."""
    flags = ["--lr_grid", "0.01", "1", "--n_last_blocks", "1", "--avgpool_patchtokens", "false"]
    _, honest = grid_result(untrained_cls_weights, tmp_path / "honest", *flags)
    import features

    setup = features.labelled_splits

    def scrambled(*args, **kwargs):
        evaluation = setup(*args, **kwargs)
        evaluation.test_labels = (evaluation.test_labels + 3) % 10
        return evaluation
    monkeypatch.setattr(features, "labelled_splits", scrambled)
    _, blind = grid_result(untrained_cls_weights, tmp_path / "blind", *flags)
    assert [r["heldout_top1"] for r in blind["grid"]] == [r["heldout_top1"] for r in honest["grid"]]
    assert blind["chosen"] == honest["chosen"]
    assert blind["top1"] < honest["top1"] - 20  # the test accuracy did read the scrambled labels


def test_heldout_rows_are_seeded_and_never_trained_on():
    train, held = eval_linear.holdout_split(1000, 0.1, seed=3)
    assert len(held) == 100 and len(train) == 900
    assert set(train.tolist()).isdisjoint(held.tolist()) and set(train.tolist()) | set(held.tolist()) == set(range(1000))
    assert torch.equal(held, eval_linear.holdout_split(1000, 0.1, seed=3)[1])
    assert not torch.equal(held, eval_linear.holdout_split(1000, 0.1, seed=4)[1])
    assert [len(part) for part in eval_linear.holdout_split(3, 0.1, seed=0)] == [2, 1]  # a tiny set holds one out
    with pytest.raises(errors.UserError, match="leaves 1 held out and 0 to train on"):
        eval_linear.holdout_split(1, 0.1, seed=0)
    features, labels = torch.arange(1000.0)[:, None], torch.arange(1000)
    batches = eval_linear.CachedBatches(features, labels, torch.arange(1000), train, 1000, 64, seed=0)
    seen = torch.cat([x[:, 0] for x, _, _ in batches])
    assert sorted(seen.long().tolist()) == train.tolist()


def test_choose_head_takes_the_best_heldout_and_skips_retired_heads():
    assert eval_linear.choose_head([50.0, 70.0, 70.0, 60.0]) == 1
    assert eval_linear.choose_head([None, 10.0, None]) == 1
    with pytest.raises(errors.UserError, match="every head of the learning-rate grid diverged"):
        eval_linear.choose_head([None, None])


def test_a_diverging_head_is_retired_and_the_grid_goes_on(untrained_cls_weights, tmp_path):
    stdout, result = grid_result(untrained_cls_weights, tmp_path, "--lr_grid", "0.1", "3e38",
                                 "--n_last_blocks", "1", "--avgpool_patchtokens", "false")
    assert "diverged: its loss is not finite; it is retired" in stdout
    assert [row["heldout_top1"] is None for row in result["grid"]] == [False, True]
    assert result["chosen"]["lr"] == 0.1 and result["top1"] > 4 * CHANCE
    warning = eval_linear.grid_edge_warning(eval_linear.probe_grid(
        argparse.Namespace(lr=None, lr_grid=[0.1, 1.0], n_last_blocks=None, avgpool_patchtokens=None),
        dict(readout="cls", arch="vit_tiny"), 12, None)[1], 0)
    assert warning and "edge of the grid" in warning


def test_grid_resumes_and_evaluates_its_chosen_head(tiny_sparo_checkpoint, tmp_path):
    """A SPARO grid (one feature variant, the encoding): two epochs, then a third on resume,
    then --evaluate scores the chosen head exactly as the run did."""
    common = ["--pretrained_weights", tiny_sparo_checkpoint, *GRID[:6], "--lr_grid", "0.1", "10",
              "--output_dir", tmp_path, "--val_freq", "1"]
    run_linear(*common, "--epochs", "2")
    second = run_linear(*common, "--epochs", "3", "--output_json", tmp_path / "r.json")
    assert "Resuming from" in second and "at epoch 2" in second
    result = json.loads((tmp_path / "r.json").read_text())
    assert {row["n_last_blocks"] for row in result["grid"]} == {None}
    evaluated = run_linear(*common, "--evaluate")
    assert f"Accuracy of the network on the 360 test images: {result['top1']:.1f}%" in evaluated
    with pytest.raises(errors.UserError, match="another grid"):
        run_linear(*common, "--evaluate", "--lr_grid", "0.1", "1")


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.1", "--lr_grid", "0.1", "1"], "give one of the two"),
    (["--holdout_fraction", "0"], "--holdout_fraction must be above 0"),
    (["--holdout_fraction", "1"], "leaves no training image"),
])
def test_grid_refusals(tiny_sparo_checkpoint, tmp_path, flags, message):
    with pytest.raises(errors.UserError, match=re.escape(message)):
        run_linear("--pretrained_weights", tiny_sparo_checkpoint, "--data_path", "digits",
                   "--output_dir", tmp_path, *flags)


@pytest.mark.parametrize("readout, scaled", [("gap", False), ("cls_proj", True)])
def test_control_features_are_their_encodings(readout, scaled):
    """The controls' probe feature is their encoding; cls_proj's (unit norm, like SPARO's) is
    rescaled to unit coordinates, gap's (a mean of LayerNorm'd tokens) is not."""
    config = vits.BackboneConfig("vit_nano", 4, 16, readout=readout, sparo_slots=4, sparo_dim=8)
    model = config.build().eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = eval_linear.frozen_features(model, images, config.to_dict(), 4, True, None)
        encoding = model(images)
    width = eval_linear.feature_dim(config.to_dict(), 4, True, None)
    assert features.shape == encoding.shape == (2, width) == (2, 32 if readout == "cls_proj" else 96)
    torch.testing.assert_close(features, encoding * (width ** 0.5 if scaled else 1.0))
