"""Linear probe (eval_linear.py): DINO's CLS feature against the model's own outputs, real
learning on digits from a frozen backbone (images and cached features), resume, --evaluate
of the saved head, and refusals."""
import json
import re

import pytest
import torch

import eval_linear
import utils
import vision_transformer as vits
from helpers import read_log, run_script

ACCURACY_LINE = re.compile(r"Accuracy at epoch (\d+) of the network on the (\d+) test images: ([\d.]+)%")
CHANCE = 10.0  # digits: 10 balanced classes


def accuracies(stdout):
    return [(int(e), int(n), float(a)) for e, n, a in ACCURACY_LINE.findall(stdout)]


def final_top1(stdout):
    return float(re.search(r"^Top-1 test accuracy: ([\d.]+)$", stdout, re.M).group(1))


def test_cls_feature_is_dinos_concatenation():
    """n last CLS tokens (+ mean patch token): the last CLS is the model's own output and the
    pooled part is the mean of its final patch tokens."""
    torch.manual_seed(0)
    model = vits.build_backbone(vits.model_config("vit_tiny", 4, 16, readout="cls")).eval()
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
    model, config = utils.load_backbone(str(tiny_sparo_checkpoint))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        full = eval_linear.frozen_features(model.eval(), images, config, 4, False, None)
        subset = eval_linear.frozen_features(model, images, config, 4, False, [1, 7])
    assert subset.shape == (2, 2 * 16)
    torch.testing.assert_close(subset.norm(dim=1), torch.ones(2))
    expected = torch.cat([full[:, 16:32], full[:, 112:128]], 1) * (16 / 2) ** 0.5
    torch.testing.assert_close(subset, expected)


def test_learns_digits_from_cached_features(tiny_sparo_checkpoint, tmp_path):
    out = run_script("eval_linear.py", "--pretrained_weights", tiny_sparo_checkpoint,
                     "--data_path", "digits", "--train_augmentation", "none",
                     "--cache_features", "true", "--epochs", "30", "--lr", "20", "--val_freq", "10",
                     "--output_dir", tmp_path, "--output_json", tmp_path / "result.json")
    lines = accuracies(out.stdout)
    assert [epoch for epoch, _, _ in lines] == [0, 10, 20, 29]
    assert all(n == 360 for _, n, _ in lines)
    top1 = final_top1(out.stdout)
    assert top1 == max(a for _, _, a in lines) and top1 > 6 * CHANCE
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["top1"] == pytest.approx(top1, abs=0.05) and saved["head"]["num_labels"] == 10
    assert len(read_log(tmp_path / "linear_log.txt")) == 30


def test_learns_from_augmented_images_resumes_and_evaluates_its_head(tiny_sparo_checkpoint, tmp_path):
    common = ["--pretrained_weights", tiny_sparo_checkpoint, "--data_path", "digits",
              "--lr", "20", "--output_dir", tmp_path]
    first = run_script("eval_linear.py", *common, "--epochs", "3", "--val_freq", "5")
    # validation at epoch 0 and at the last epoch of the 3-epoch schedule
    assert [e for e, _, _ in accuracies(first.stdout)] == [0, 2]
    assert accuracies(first.stdout)[-1][2] > 3 * CHANCE
    second = run_script("eval_linear.py", *common, "--epochs", "4", "--val_freq", "5")
    assert "Resuming from" in second.stdout and "at epoch 3" in second.stdout
    assert [e for e, _, _ in accuracies(second.stdout)] == [3]
    assert [r["epoch"] for r in read_log(tmp_path / "linear_log.txt")] == [0, 1, 2, 3]
    last = accuracies(second.stdout)[-1][2]

    evaluated = run_script("eval_linear.py", *common, "--evaluate")
    assert f"Accuracy of the network on the 360 test images: {last:.1f}%" in evaluated.stdout
    assert "Epoch: [" not in evaluated.stdout  # no training

    # the head belongs to the teacher's features: the student's are refused
    other = run_script("eval_linear.py", *common, "--evaluate", "--checkpoint_key", "student",
                       check=False)
    assert other.returncode == 2 and "backbone_fingerprint" in other.stderr


@pytest.mark.parametrize("flags, message", [
    (["--cache_features", "true"], "--cache_features needs --train_augmentation none"),
    (["--num_labels", "5"], "--num_labels 5 is too small"),
    (["--slots", "0,99"], "between 0 and 15"),
])
def test_refusals(tiny_sparo_checkpoint, tmp_path, flags, message):
    out = run_script("eval_linear.py", "--pretrained_weights", tiny_sparo_checkpoint,
                     "--data_path", "digits", "--output_dir", tmp_path, *flags, check=False)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_evaluate_without_a_saved_head_is_a_clear_error(tiny_sparo_checkpoint, tmp_path):
    out = run_script("eval_linear.py", "--pretrained_weights", tiny_sparo_checkpoint,
                     "--data_path", "digits", "--output_dir", tmp_path, "--evaluate", check=False)
    assert out.returncode == 2 and "linear_checkpoint.pth does not exist" in out.stderr
