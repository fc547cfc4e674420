"""--subset / --train_subset / --test_subset of a folder are class-balanced (issue 20)."""
import numpy as np
import pytest
from PIL import Image

import datasets


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """DINO's layout with 5, 2 and 4 images in classes a, b, c (train/ and val/ alike)."""
    root = tmp_path_factory.mktemp("three_classes")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, count in (("a", 5), ("b", 2), ("c", 4)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / split / label / f"{i}.png")
    return root


def round_robin(labels, count):
    """The same selection written as the loop it describes."""
    queues = {c: [i for i, label in enumerate(labels) if label == c] for c in sorted(set(labels))}
    picked = []
    while len(picked) < count:
        for c in queues:
            if queues[c] and len(picked) < count:
                picked.append(queues[c].pop(0))
    return sorted(picked)


@pytest.mark.parametrize("split", ["pretrain", "train", "test"])
def test_folder_subset_spans_every_class_and_is_deterministic(three_classes, split):
    root = str(three_classes / "train") if split == "pretrain" else str(three_classes)
    full = list(datasets.dataset_labels(datasets.build_dataset(root, split)))
    assert full == [0] * 5 + [1] * 2 + [2] * 4  # a folder lists its images class by class
    for count in (1, 3, 7, 10):
        subset = datasets.build_dataset(root, split, subset=count)
        assert list(subset.indices) == round_robin(full, count)
        assert list(datasets.build_dataset(root, split, subset=count).indices) == list(subset.indices)
    labels = datasets.dataset_labels(datasets.build_dataset(root, split, subset=7))
    assert np.bincount(labels).tolist() == [3, 2, 2]  # the first 7 would be a, a, a, a, a, b, b


def test_balanced_indices_match_the_round_robin_loop():
    labels = np.random.default_rng(3).integers(0, 6, 200)
    for count in (0, 1, 5, 6, 50, 199, 200):
        assert datasets.balanced_indices(labels, count) == round_robin(list(labels), count)


def test_builtin_subset_keeps_the_first_images():
    # bench/quality.py --eval_split heldout relies on it: training images 50000 on stay unseen
    assert list(datasets.build_dataset("digits", "train", subset=40).indices) == list(range(40))
