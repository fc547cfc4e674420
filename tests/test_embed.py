"""embed.py: encodings of every image of a nested folder, with names, a corrupt image listed
(not silently dropped), per-slot output, and the same rows under torchrun."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import embed
import errors
import features as feats
import weight_files
from helpers import REPO


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Six digits in a nested folder, a corrupt .png, a non-image and a hidden file."""
    root = tmp_path_factory.mktemp("images")
    images, _ = datasets.load_digits_split("test")
    places = ["3.png", "a/1.png", "a/b/2.png", "a/b/0.jpg", "z/4.bmp", "z/5.png"]
    for image, place in zip(images, places):
        (root / place).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((20, 20)).save(root / place)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(images[0]).save(root / ".hidden.png")
    return root, sorted(places)


def reference_encodings(checkpoint, root, names):
    """One image at a time through the evaluation pre-processing, in name order."""
    model, config = weight_files.load_backbone(str(checkpoint))
    transform = feats.eval_transform(int(config["img_size"]))
    with torch.no_grad():
        return torch.cat([model.eval()(transform(datasets.load_rgb_image(str(root / n)))[None]) for n in names])


def test_every_readable_image_is_encoded_and_the_corrupt_one_listed(tiny_sparo_checkpoint, image_folder,
                                                                    tmp_path, capsys):
    root, names = image_folder
    out = tmp_path / "emb.npy"
    embed.main(["--pretrained_weights", str(tiny_sparo_checkpoint), "--data_path", str(root),
                "--output", str(out), "--batch_size_per_gpu", "4", "--num_workers", "0"])
    features = np.load(out)
    assert (out.with_suffix(".txt")).read_text().splitlines() == names
    unreadable = out.with_suffix(".unreadable.txt").read_text().splitlines()
    assert len(unreadable) == 1 and unreadable[0].startswith("a/broken.png\t")
    assert "Error" in unreadable[0]  # the reason, e.g. UnidentifiedImageError
    assert "unreadable image left out: a/broken.png" in capsys.readouterr().err
    expected = reference_encodings(tiny_sparo_checkpoint, root, names)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)

    out_pt = tmp_path / "emb.pt"
    embed.main(["--pretrained_weights", str(tiny_sparo_checkpoint), "--data_path", str(root),
                "--output", str(out_pt), "--per_slot", "true", "--num_workers", "0"])
    saved = torch.load(out_pt, weights_only=True)
    assert saved["names"] == names and saved["unreadable"][0].startswith("a/broken.png\t")
    assert saved["features"].shape == (len(names), 16, 16)  # (N, L, V)
    np.testing.assert_allclose(saved["features"].reshape(len(names), -1).numpy(), features,
                               rtol=1e-5, atol=1e-6)


def test_unreadable_image_policies_skip_fail_or_mark(image_folder):
    """The three wrappers around one labelled file list: training skips a bad file (serving the
    next), evaluation stops naming it, embed.py marks it as an all-NaN image with its label."""
    root, _ = image_folder
    files = [root / "3.png", root / "a" / "broken.png", root / "z" / "5.png"]
    transform = feats.eval_transform(16)
    labelled = datasets.ImageFiles([(str(f), i) for i, f in enumerate(files)], [], transform)
    marked = embed.image_files(files, transform, 16)
    image, label = marked[1]
    assert label == 1 and image.shape == (3, 16, 16) and torch.isnan(image).all()
    for position in (0, 2):
        image, label = marked[position]
        assert label == position and torch.equal(image, labelled[position][0])
    image, label = datasets.SkipUnreadableImages(labelled)[1]
    assert label == 2 and torch.equal(image, labelled[2][0])
    with pytest.raises(errors.UserError, match="cannot read image .*broken.png"):
        datasets.FailOnUnreadableImages(labelled)[1]


def test_bad_requests_are_one_line_errors(tiny_sparo_checkpoint, image_folder, tmp_path):
    root, _ = image_folder
    common = ["--pretrained_weights", str(tiny_sparo_checkpoint)]
    with pytest.raises(errors.UserError, match="must end in .npy or .pt"):
        embed.main([*common, "--data_path", str(root), "--output", str(tmp_path / "emb.csv")])
    with pytest.raises(errors.UserError, match="holds no images"):
        (tmp_path / "empty").mkdir()
        embed.main([*common, "--data_path", str(tmp_path / "empty"), "--output", str(tmp_path / "e.npy")])


@pytest.mark.slow
def test_two_processes_write_the_same_rows(tiny_sparo_checkpoint, image_folder, tmp_path):
    root, names = image_folder  # 7 files on 2 processes: one rank gets a padded duplicate
    out = tmp_path / "emb.npy"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "embed.py",
         "--pretrained_weights", str(tiny_sparo_checkpoint), "--data_path", str(root), "--output", str(out),
         "--batch_size_per_gpu", "2", "--num_workers", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert out.with_suffix(".txt").read_text().splitlines() == names
    assert out.with_suffix(".unreadable.txt").read_text().startswith("a/broken.png\t")
    expected = reference_encodings(tiny_sparo_checkpoint, root, names)
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-5, atol=1e-6)
