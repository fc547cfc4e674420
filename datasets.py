"""The labelled image data sets of every script: the built-in Fashion-MNIST and digits, image
folders (DINO's ImageFolder layout, scanned here so that links and special files are safe),
image reading to 8-bit RGB, and the policies for unreadable images (skipped in pre-training,
an error in evaluation)."""
from __future__ import annotations

import gzip
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import torch

from errors import UserError, short_list

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_INSTALL = ("apt-get install dataset-fashion-mnist (as root), or "
                         "apt-get download dataset-fashion-mnist && dpkg-deb -x "
                         "dataset-fashion-mnist_*.deb DIR and set FASHION_MNIST_DIR="
                         "DIR/usr/share/datasets/fashion-mnist")
BUILTIN_DATASETS = ("fashion_mnist", "digits")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ArrayImageDataset(torch.utils.data.Dataset):
    """Grey uint8 images (N, H, W) with labels, served as PIL images through a transform: RGB,
    or with grey=True single-channel ("L") images for a transform that ends in
    `to_three_channels` (DINO's augmentation then takes less time: BENCHMARKS.md, grey augmentation)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 transform: Optional[Callable] = None, grey: bool = False) -> None:
        self.images, self.targets, self.transform = images, labels.astype(np.int64), transform
        self.classes = [str(c) for c in sorted(set(self.targets.tolist()))]
        self.grey = grey

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = PIL.Image.fromarray(self.images[index], mode="L")
        if not self.grey:
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def to_three_channels(image: torch.Tensor) -> torch.Tensor:
    """A (1, H, W) grey image tensor as (3, H, W) RGB; 3-channel tensors pass unchanged."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): big-endian header, then raw uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir() -> Path:
    """The folder holding the Debian package's Fashion-MNIST files."""
    candidates = [os.environ["FASHION_MNIST_DIR"]] if os.environ.get("FASHION_MNIST_DIR") else []
    for folder in map(Path, candidates + list(FASHION_MNIST_DIRS)):
        if (folder / "train-labels-idx1-ubyte.gz").exists() or \
                (folder / "train-labels-idx1-ubyte").exists():
            return folder
    raise UserError(f"Fashion-MNIST is not installed; install it with: {FASHION_MNIST_INSTALL}")


def load_fashion_mnist(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's official train (60k) or test (10k) split as (images, labels)."""
    folder = fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"

    def read(kind: str) -> np.ndarray:
        name = f"{prefix}-{kind}-ubyte"
        path = folder / f"{name}.gz"
        return _read_idx(path if path.exists() else folder / name)

    return read("images-idx3"), read("labels-idx1")


def load_digits_split(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits; test = every 5th image (360), train = the rest (1,437)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise UserError("the digits data set needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels
    is_test = np.arange(len(images)) % 5 == 0
    keep = is_test if split == "test" else ~is_test
    return np.ascontiguousarray(images[keep]), digits.target[keep]


def load_rgb_image(path: str) -> Any:
    """Open any image as 8-bit RGB: grey, palette, RGBA (on black) and 16-bit images included."""
    with open(path, "rb") as handle:
        image = PIL.Image.open(handle)
        image.load()
    return to_rgb(image)


def open_image(path: str) -> Any:
    """Open an image without decoding it (the file is read, and closed, at its first load()):
    a JPEG can then be decoded at reduced resolution (augmentations.MultiCropGeometry)."""
    return PIL.Image.open(path)


def to_rgb(image: Any) -> Any:
    """A decoded PIL image as 8-bit RGB (see load_rgb_image)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = PIL.Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        image = PIL.Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def image_folder(root: str, transform: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None,
                 loader: Callable[[str], Any] = load_rgb_image) -> torch.utils.data.Dataset:
    """The images under `root`, ImageFolder-style: one class per sub-folder (sorted names), or
    one class for a flat folder of images, read by `loader` (8-bit RGB by default).

    class_names: number the classes by this list (the training split's classes) instead of
    by the folder's own sub-folders, so that a val/ holding a subset of the classes gets the
    training labels; a class missing from the list is an error naming it.
    """
    path = Path(root)
    if not path.is_dir():
        raise UserError(f"data folder {root} does not exist (built-in data sets: "
                        f"{', '.join(BUILTIN_DATASETS)})")
    classes = class_folders(path)
    if not classes:
        files = _image_files(path, path, set(), recurse=False)
        if not files:
            raise UserError(f"data folder {root} holds no images (extensions: "
                            f"{' '.join(IMAGE_EXTENSIONS)})")
        return ImageFiles([(f, 0) for f in files], ["images"], transform, loader)
    names = list(class_names) if class_names is not None else classes
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise UserError(f"{root} has classes that the training split lacks: {short_list(unknown)}; "
                        f"a classifier can only predict training classes")
    seen: set = set()
    samples, empty = [], []
    for name in classes:
        files = _image_files(path / name, path, seen, recurse=True)
        empty += [] if files else [name]
        label = names.index(name)
        samples += [(f, label) for f in files]
    if empty:
        raise UserError(f"data folder {root} holds no images in {short_list(empty)} (extensions: "
                        f"{' '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(samples, names, transform, loader)


def class_folders(root: Path) -> List[str]:
    """Sorted names of the class sub-folders of root (links to folders included), leaving out
    links back to root or above it (`loop -> ..`), which would count images twice."""
    above = {root.resolve(), *root.resolve().parents}
    return sorted(child.name for child in root.iterdir()
                  if child.is_dir() and child.resolve() not in above)


def _image_files(folder: Path, root: Path, seen: set, recurse: bool) -> List[str]:
    """Image files under folder in ImageFolder's order. Only regular files (or links to them)
    count: a FIFO named x.jpg would block the loader forever. Links are followed, but each
    folder is entered once, links back to root or above are not entered, and each file is
    counted once (`seen` holds real paths across calls), so link loops end and linked
    duplicates are not counted twice. Costs one stat per link and per folder, not per file."""
    above = {str(root.resolve()), *map(str, root.resolve().parents)}
    visited: set = set()
    found: List[Tuple[str, str]] = []

    def walk(current: str) -> None:
        real_dir = os.path.realpath(current)
        if real_dir in visited:
            return
        visited.add(real_dir)
        with os.scandir(current) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        for entry in entries:
            if entry.is_dir():  # follows links
                if recurse and os.path.realpath(entry.path) not in above:
                    walk(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                real = os.path.realpath(entry.path) if entry.is_symlink() \
                    else f"{real_dir}/{entry.name}"
                if real not in seen:
                    seen.add(real)
                    found.append((current, entry.name))

    walk(str(folder))
    return [f"{directory}/{name}" for directory, name in sorted(found)]


class ImageFiles(torch.utils.data.Dataset):
    """Labelled image files (path, label), read by `loader` (8-bit RGB by default); `classes`
    names the labels."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str],
                 transform: Optional[Callable] = None,
                 loader: Callable[[str], Any] = load_rgb_image) -> None:
        self.samples, self.classes, self.transform = samples, classes, transform
        self.loader = loader
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, label = self.samples[index]
        image = self.loader(path)
        return (self.transform(image) if self.transform else image), label


# What PIL raises on bad files; a decompression bomb (an image of more than twice
# Image.MAX_IMAGE_PIXELS pixels, mostly a hostile or broken header) is one more unreadable image.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


class SkipUnreadableImages(torch.utils.data.Dataset):
    """Pre-training data that survives bad files: an unreadable or truncated image is skipped
    with a warning naming it (the next readable image is served in its place). A long run
    should not die on one corrupt JPEG; labels are unused, so nothing else changes."""

    max_consecutive_failures = 50

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        self.warned: set = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        for attempt in range(self.max_consecutive_failures):
            position = (index + attempt) % len(self.dataset)
            try:
                return self.dataset[position]
            except UNREADABLE_IMAGE_ERRORS as error:
                self._warn(position, error)
        raise UserError(f"{self.max_consecutive_failures} images in a row are unreadable "
                        f"(from {_sample_path(self.dataset, index)}); check the data folder")

    def _warn(self, position: int, error: Exception) -> None:
        if position not in self.warned:
            self.warned.add(position)
            print(f"Warning: skipping unreadable image {_sample_path(self.dataset, position)} "
                  f"({type(error).__name__}: {error})", file=sys.stderr, flush=True)


class FailOnUnreadableImages(SkipUnreadableImages):
    """Evaluation data: an unreadable image is an error naming the file, because silently
    dropping test images would change the reported accuracy."""

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except UNREADABLE_IMAGE_ERRORS as error:
            raise UserError(f"cannot read image {_sample_path(self.dataset, index)} "
                            f"({type(error).__name__}: {error})") from error


class NanForUnreadableImages(SkipUnreadableImages):
    """Encoding a folder (embed.py): an unreadable image becomes an all-NaN image of `shape`
    with its label, so that the encoding loop (in loader workers, maybe on other processes)
    marks it and goes on; the caller leaves its row out and lists the file."""

    def __init__(self, dataset: torch.utils.data.Dataset, shape: Tuple[int, ...]) -> None:
        super().__init__(dataset)
        self.shape = shape

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except UNREADABLE_IMAGE_ERRORS:
            return torch.full(self.shape, float("nan")), self.dataset.targets[index]


def _sample_path(dataset: Any, index: int) -> str:
    samples = getattr(dataset, "samples", None)
    return samples[index][0] if samples else f"#{index}"


def build_dataset(data_path: str, split: str, transform: Optional[Callable] = None,
                  subset: Optional[int] = None, grey: bool = False,
                  lazy: bool = False) -> torch.utils.data.Dataset:
    """A labelled image data set by built-in name or folder.

    split: "pretrain" (a whole ImageFolder, or the built-in train split), "train" or "test"
    (built-in splits, or the folder's train/ and val/ sub-folders, DINO's layout).
    subset: keep N images; of a folder, N class-balanced ones (balanced_indices), because a
    folder lists its images class by class; of a built-in set (stored shuffled), the first N,
    so that bench/quality.py's held-out images (training images 50000 on) stay unseen.
    grey: serve the built-in (grey) data sets as single-channel images; the transform must
    then make them 3-channel (to_three_channels). Folders are always read as RGB.
    lazy: pre-training folders give the transform undecoded images (open_image); the transform
    decodes them and converts them to RGB (augmentations.MultiCropGeometry).
    """
    split_name = "train" if split in ("pretrain", "train") else "test"
    if data_path == "fashion_mnist":
        dataset: torch.utils.data.Dataset = ArrayImageDataset(*load_fashion_mnist(split_name),
                                                              transform, grey)
    elif data_path == "digits":
        dataset = ArrayImageDataset(*load_digits_split(split_name), transform, grey)
    elif split == "pretrain":
        loader = open_image if lazy else load_rgb_image
        dataset = SkipUnreadableImages(image_folder(data_path, transform, loader=loader))
    else:
        if not Path(data_path).is_dir():
            image_folder(data_path)  # raises the "does not exist" error with the built-in names
        folder = Path(data_path) / ("train" if split_name == "train" else "val")
        if not folder.is_dir():
            raise UserError(f"{data_path} needs a {folder.name}/ sub-folder (DINO's layout: "
                            f"DATA/train/CLASS/IMG, DATA/val/CLASS/IMG)")
        # val/ is numbered by train/'s class names: a val/ with a subset of the classes
        # keeps the training labels (each split numbering its own classes shifts them).
        train_classes = class_folders(folder.parent / "train") if split_name == "test" \
            and (folder.parent / "train").is_dir() else []
        dataset = FailOnUnreadableImages(image_folder(str(folder), transform, train_classes or None))
    if subset is not None and 0 < subset < len(dataset):
        builtin = data_path in ("fashion_mnist", "digits")
        indices = range(subset) if builtin else balanced_indices(dataset_labels(dataset), subset)
        dataset = torch.utils.data.Subset(dataset, indices)
    if len(dataset) == 0:
        raise UserError(f"data set {data_path} ({split}) is empty")
    return dataset


def balanced_indices(labels: np.ndarray, count: int) -> List[int]:
    """`count` indices taken round-robin over the classes: every class's i-th image (in data
    set order) before any class's (i+1)-th, classes in label order; a class that runs out
    is passed over. Returned in data set order, deterministic."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    group_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    position = np.empty(len(labels), dtype=np.int64)
    position[order] = np.arange(len(labels)) - group_start  # rank of each image within its class
    chosen = np.lexsort((labels, position))[:count]  # by position, then label
    return sorted(int(i) for i in chosen)


def dataset_labels(dataset: torch.utils.data.Dataset) -> np.ndarray:
    """The integer labels of a data set built by build_dataset, without loading images."""
    if isinstance(dataset, torch.utils.data.Subset):
        return np.asarray(dataset_labels(dataset.dataset))[list(dataset.indices)]
    if isinstance(dataset, SkipUnreadableImages):
        return dataset_labels(dataset.dataset)
    return np.asarray(dataset.targets, dtype=np.int64)




def dataset_fingerprint(dataset: torch.utils.data.Dataset) -> str:
    """SHA-256 of what a data set built by build_dataset serves, without decoding images: its
    samples (the image bytes of a built-in set; the file names, relative to the folder, and
    sizes of a folder's images: a copy or a move of the folder keeps them) and labels, in order. Saved results (eval_linear's heads) name the data they came from."""
    digest = hashlib.sha256()
    indices: Sequence[int] = range(len(dataset))
    while True:  # unwrap Subset and the unreadable-image policies down to the samples
        if isinstance(dataset, torch.utils.data.Subset):
            indices = [int(dataset.indices[i]) for i in indices]
            dataset = dataset.dataset
        elif isinstance(dataset, SkipUnreadableImages):
            dataset = dataset.dataset
        else:
            break
    if isinstance(dataset, ArrayImageDataset):
        digest.update(np.ascontiguousarray(dataset.images[np.asarray(indices, dtype=np.int64)]).tobytes())
    else:
        paths = [dataset.samples[i][0] for i in indices]
        root = os.path.commonpath(paths) if paths else ""
        digest.update("\n".join(f"{os.path.relpath(p, root)}\t{os.stat(p).st_size}"
                                for p in paths).encode("utf-8", "surrogateescape"))
    digest.update(np.asarray(dataset.targets, dtype=np.int64)[np.asarray(indices, dtype=np.int64)].tobytes())
    return digest.hexdigest()
