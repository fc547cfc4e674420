"""plot_runs.py: one PNG from real runs' log.txt, labelled by read-out and differing flags."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import errors
import plot_runs
import run_folder
from helpers import TINY_TRAIN_ARGS, run_script


def test_labels_name_the_readout_and_the_differing_flags(tmp_path):
    flags = [dict(readout="sparo", lr=0.1, epochs=2, output_dir="a", seed=0),
             dict(readout="cls", lr=0.1, epochs=4, output_dir="b", seed=0),
             dict(readout="cls", lr=0.1, epochs=4, output_dir="c", seed=0)]
    dirs = [tmp_path / name for name in "abc"]
    assert plot_runs.run_labels(dirs, flags) == ["sparo epochs=2", "cls epochs=4 (b)", "cls epochs=4 (c)"]


def test_missing_and_empty_logs_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.txt").write_text("")
    for folder, message in (("nowhere", "has no log.txt"), ("empty", "is empty")):
        with pytest.raises(errors.UserError, match=message):
            plot_runs.main([str(tmp_path / folder), "--output", str(tmp_path / "runs.png")])
    assert not (tmp_path / "runs.png").exists()


@pytest.mark.slow
def test_plots_a_sparo_and_a_cls_run(tiny_sparo_checkpoint, tmp_path):
    sparo = tmp_path / "sparo"
    shutil.copytree(tiny_sparo_checkpoint.parent, sparo)
    cls = tmp_path / "cls"
    run_script("main_dino_sparo.py", *TINY_TRAIN_ARGS, "--subset", "64", "--batch_size_per_gpu", "16",
               "--epochs", "2", "--readout", "cls", "--output_dir", cls)
    with open(cls / "log.txt", "a") as log:  # a k-NN figure, as --eval_every will log it
        log.write(json.dumps({"epoch": 2, "knn_top1": 42.0}) + "\n")
    process = run_script("plot_runs.py", sparo, cls, "--output", tmp_path / "runs.png")
    assert "Wrote" in process.stdout
    image = np.asarray(Image.open(tmp_path / "runs.png").convert("L"))
    # four panels (the k-NN one too) in 2 x 2 of 5.5 x 3.8 inches at 120 dpi; three would be 1 x 3
    assert image.shape == (2 * 3.8 * 120, 2 * 5.5 * 120)
    half_h, half_w = image.shape[0] // 2, image.shape[1] // 2
    for quadrant in (image[:half_h, :half_w], image[:half_h, half_w:], image[half_h:, :half_w], image[half_h:, half_w:]):
        assert (quadrant < 128).mean() > 0.005
    labels = plot_runs.run_labels([sparo, cls], [run_folder.read_flags(sparo), run_folder.read_flags(cls)])
    assert labels[0].startswith("sparo") and labels[1].startswith("cls")
    assert "epochs=1" in labels[0] and "subset=256" in labels[0] and "subset=64" in labels[1]
