"""Data-augmentation cost: DINO's multi-crop on grey images served as RGB vs as one channel.

    python bench/augmentation_speed.py                                   # the CPU table recipe
    python bench/augmentation_speed.py --global_crops_size 224 --local_crops_size 96 \
        --local_crops_number 8                                          # DINO's crop sizes

With `--num_workers 0` (the CPU recipes) the training process augments each batch itself, on
one core, between steps, so this cost adds to bench/train_throughput.py's step time. Both
paths draw the same random numbers and give identical crops (tests/test_dino_training.py);
the grey path is what main_dino_sparo.py uses for the built-in grey data sets. Fashion-MNIST
training images, one process, the two paths timed alternately in the same run.

    python bench/augmentation_speed.py --suite jpeg                      # the two-stage pipeline

`--suite jpeg` writes a folder of real JPEG photographs of ImageNet-like sizes (crops of
scikit-learn's two sample photographs, `--photos` of them) and times per image, on one core,
in interleaved rounds: DINO's own PIL pipeline (DataAugmentationDINO imported from the
original code, `--dino_ref`, with its ImageFolder loader), this project's CPU stage
(augmentations.MultiCropGeometry, with and without JPEG draft decoding) and decoding alone;
then the device stage (augmentations.PhotometricAugmentation) per image in batches on the
device at hand; then end-to-end training images/s on CPU (a small ViT, a few steps of
main_dino_sparo.py) with each pipeline and 1 and 2 loader workers. It ends with the line
`cpu-stage speed-up over DINO: N.NNx`.
"""
from __future__ import annotations

import argparse
import functools
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import augmentations  # noqa: E402
import config_files  # noqa: E402
import datasets  # noqa: E402
import errors  # noqa: E402
import main_dino_sparo as dino  # noqa: E402
import run_folder  # noqa: E402
from bench.dino_original import DINO_REPO, load_dino  # noqa: E402
from bench.measure import best_of_interleaved, best_seconds, header, seconds_per_item, write_json  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("augmentation_speed", parents=[dino.get_args_parser()])
    parser.add_argument("--images", type=int, default=2000, help="Images augmented per path and round.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating timed rounds per path.")
    parser.add_argument("--output_json", default=None, help="Also write the results here.")
    parser.add_argument("--suite", default="grey", choices=("grey", "jpeg"),
                        help="grey: RGB vs single-channel Fashion-MNIST (the CPU recipe); jpeg: "
                             "DINO's PIL pipeline vs the two-stage pipeline on real JPEGs.")
    parser.add_argument("--photos", type=int, default=300, help="jpeg: JPEG files written and timed.")
    parser.add_argument("--jpeg_crops", type=int, nargs=3, default=(224, 96, 8),
                        metavar=("GLOBAL", "LOCAL", "NUMBER"),
                        help="jpeg: global crop size, local crop size, local crops (DINO's by default).")
    parser.add_argument("--dino_ref", default=DINO_REPO,
                        help="jpeg: a checkout of facebookresearch/dino, for its DataAugmentationDINO "
                             "(default: the DINO_REPO environment variable).")
    parser.add_argument("--device_batch", type=int, default=32, help="jpeg: images per device-stage batch.")
    parser.add_argument("--train_images", type=int, default=64,
                        help="jpeg: images per end-to-end training epoch (0 skips that part).")
    parser.set_defaults(config=None, global_crops_size=28, local_crops_size=14, local_crops_number=2,
                        global_crops_scale=(0.3, 1.0), local_crops_scale=(0.1, 0.3))
    return parser


def time_path(dataset: torch.utils.data.Dataset, count: int) -> float:
    """Seconds per image to produce every crop of `count` images."""
    random.seed(0), torch.manual_seed(0)
    return seconds_per_item(dataset.__getitem__, range(count))


def main(argv: List[str] | None = None) -> Dict[str, float]:
    args = config_files.parse_args_with_config(get_args_parser(), argv)
    if args.suite == "jpeg":
        return jpeg_suite(args)
    transform = dino.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale,
                                          args.local_crops_number, args.global_crops_size,
                                          args.local_crops_size)
    by_grey = {grey: datasets.build_dataset("fashion_mnist", "pretrain", transform, subset=args.images,
                                            grey=grey) for grey in (False, True)}
    count = len(by_grey[True])
    best = best_of_interleaved({name: functools.partial(time_path, by_grey[name == "grey"], count)
                                for name in ("rgb", "grey")}, args.rounds)
    rgb, grey = best["rgb"], best["grey"]
    print(header(torch.device("cpu")))
    print(f"crops: 2x{args.global_crops_size}px + {args.local_crops_number}x{args.local_crops_size}px, "
          f"{count} Fashion-MNIST images, best of {args.rounds} rounds")
    print(f"       rgb: {rgb * 1e3:7.3f} ms/image")
    print(f"      grey: {grey * 1e3:7.3f} ms/image")
    print(f"grey/rgb time ratio: {grey / rgb:.3f}")
    result = dict(rgb_ms_per_image=rgb * 1e3, grey_ms_per_image=grey * 1e3, ratio=grey / rgb)
    write_json(args.output_json, result)
    return result


# =============================================================================== jpeg suite
def write_photos(folder: Path, count: int, seed: int = 0) -> Dict[str, float]:
    """`count` JPEGs cut from scikit-learn's two photographs at ImageNet-like sizes: the longer
    side is 500 px for 60 % (ImageNet's most common size), else uniform in 300-1000 px;
    aspect 4:3, 3:2, 1:1 or their portrait forms; quality 75-95. Every photo is drawn first,
    from one seeded stream, then written, in parallel on every core for many photos."""
    from concurrent.futures import ProcessPoolExecutor

    rng = np.random.default_rng(seed)
    sizes = [photo.shape[1::-1] for photo in sample_photos()]
    specs = []
    for index in range(count):
        source_width, source_height = sizes[index % len(sizes)]
        aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3]))
        longer = 500 if rng.random() < 0.6 else int(rng.integers(300, 1001))
        width, height = (longer, round(longer / aspect)) if aspect >= 1 else (round(longer * aspect), longer)
        # a random window of the source with the target aspect, 50-100 % of the largest one
        fit = min(source_width / width, source_height / height) * float(rng.uniform(0.5, 1.0))
        w, h = width * fit, height * fit
        left, top = rng.uniform(0, source_width - w), rng.uniform(0, source_height - h)
        specs.append((str(folder / f"{index:04d}.jpg"), index % len(sizes), (width, height),
                      (left, top, left + w, top + h), int(rng.integers(75, 96))))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if count >= 64 and cores > 1:
        with ProcessPoolExecutor(cores) as pool:
            list(pool.map(write_photo, specs, chunksize=16))
    else:
        for spec in specs:
            write_photo(spec)
    return dict(mean_megapixels=float(np.mean([w * h for _, _, (w, h), _, _ in specs])) / 1e6, count=count)


@functools.lru_cache(maxsize=1)
def sample_photos() -> List[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def write_photo(spec: Tuple[str, int, Tuple[int, int], Tuple[float, ...], int]) -> None:
    """One photo of write_photos: a window of a sample photograph, resized, saved as JPEG."""
    from PIL import Image

    path, source, size, box, quality = spec
    image = Image.fromarray(sample_photos()[source])
    image.resize(size, Image.Resampling.BICUBIC, box=box).save(path, quality=quality)


def load_dino_augmentation(dino_ref: Optional[str]) -> Any:
    """DINO's own DataAugmentationDINO class, imported from the original code (bench/dino_original.py)."""
    if not dino_ref:
        raise errors.UserError("the jpeg suite at 224/96 px times DINO's own pipeline: give its code "
                               "with --dino_ref PATH or the DINO_REPO environment variable")
    return load_dino(dino_ref).main_dino.DataAugmentationDINO


def time_device_stage(geometry: Any, paths: List[str], local_number: int, global_size: int,
                      batch: int, device: torch.device, rounds: int) -> float:
    """Seconds per image of the device stage on `device`, in batches of `batch` images."""
    samples = [geometry(datasets.open_image(p)) for p in paths[:batch]]
    crops = [torch.stack([s[k] for s in samples]).to(device) for k in range(len(samples[0]))]
    stage = augmentations.PhotometricAugmentation(local_number, global_size)
    stage(crops)  # warm-up
    return best_seconds(lambda: stage(crops), device, rounds) / len(samples)


def train_images_per_second(folder: Path, on_device: bool, workers: int, sizes: Tuple[int, int, int],
                            images: int, scratch: Path) -> float:
    """End-to-end images/s of main_dino_sparo.py on CPU (ViT-tiny/16, a narrow head): the
    second of two epochs of `images` images, from its log (worker start-up included)."""
    global_size, local_size, local_number = sizes
    batch = 8 if images >= 16 else 2
    out = scratch / f"train_{int(on_device)}_{workers}"
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "main_dino_sparo.py"),
               "--arch", "vit_tiny", "--patch_size", "16", "--data_path", str(folder), "--subset", str(images),
               "--batch_size_per_gpu", str(batch), "--global_crops_size", str(global_size),
               "--local_crops_size", str(local_size), "--local_crops_number", str(local_number),
               "--out_dim", "1024", "--head_hidden_dim", "256", "--head_bottleneck_dim", "64",
               "--sparo_slots", "16", "--sparo_dim", "16", "--epochs", "2", "--warmup_epochs", "1",
               "--num_workers", str(workers), "--augment_on_device", str(on_device).lower(),
               "--saveckp_freq", "0", "--print_freq", "1000", "--output_dir", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    log = run_folder.read_log(out)
    return (images // batch) * batch / log[-1]["epoch_seconds"]


def jpeg_suite(args: argparse.Namespace) -> Dict[str, float]:
    from torchvision.datasets.folder import pil_loader  # DINO's ImageFolder loader

    torch.set_num_threads(1)  # per core: a data-loader worker runs one thread
    global_size, local_size, local_number = args.jpeg_crops
    scales = (tuple(args.global_crops_scale), tuple(args.local_crops_scale))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        photos = write_photos(folder, args.photos)
        paths = sorted(str(p) for p in folder.iterdir())
        if (global_size, local_size) == (224, 96):
            dino_pipeline = load_dino_augmentation(args.dino_ref)(*scales, local_number)
            dino_name = "DINO's DataAugmentationDINO (facebookresearch/dino)"
        else:  # DINO's class has 224/96 built in; this project's copy of it takes sizes
            dino_pipeline = dino.DataAugmentationDINO(*scales, local_number, global_size, local_size)
            dino_name = "this project's DataAugmentationDINO (crop sizes differ from DINO's)"
        stage = {draft: augmentations.MultiCropGeometry(*scales, local_number, global_size, local_size, draft=draft)
                 for draft in (True, False)}
        work = {"dino": lambda p: dino_pipeline(pil_loader(p)),
                "cpu_stage": lambda p: stage[True](datasets.open_image(p)),
                "cpu_stage_no_draft": lambda p: stage[False](datasets.open_image(p)),
                "decode": pil_loader}
        random.seed(0), torch.manual_seed(0)
        best = {name: seconds * 1e3 for name, seconds in best_of_interleaved(
            {name: functools.partial(seconds_per_item, fn, paths) for name, fn in work.items()}, args.rounds).items()}
        drafted = sum(augmentations.draft_scale(stage[True].sample(size)[0], [global_size] * 2 + [local_size] * local_number) > 1
                      for size in (datasets.open_image(p).size for p in paths))
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        device_ms = {d.type: time_device_stage(stage[True], paths, local_number, global_size, args.device_batch,
                                               d, args.rounds) * 1e3 for d in devices}
        e2e = {}
        if args.train_images:
            torch.set_num_threads(torch.get_num_interop_threads())
            for workers in (1, 2):
                for on_device in (False, True):
                    e2e[f"{'device' if on_device else 'pil'}_{workers}w"] = train_images_per_second(
                        folder, on_device, workers, args.jpeg_crops, args.train_images, Path(tmp))
    speedup = best["dino"] / best["cpu_stage"]
    print(header(torch.device("cpu")))
    print(f"photos: {photos['count']} JPEGs, mean {photos['mean_megapixels']:.3f} Mpixel; crops: "
          f"2x{global_size}px + {local_number}x{local_size}px; one thread, best of {args.rounds} interleaved rounds")
    print(f"reference: {dino_name}")
    print(f"  DINO PIL pipeline (decode included): {best['dino']:8.2f} ms/image")
    print(f"  CPU stage, JPEG draft:               {best['cpu_stage']:8.2f} ms/image "
          f"(draft used for {drafted} of {len(paths)} images at this draw)")
    print(f"  CPU stage, no draft:                 {best['cpu_stage_no_draft']:8.2f} ms/image")
    print(f"  decode alone:                        {best['decode']:8.2f} ms/image")
    for name, value in device_ms.items():
        print(f"  device stage on {name} (batch {args.device_batch}):     {value:8.2f} ms/image")
    for name, value in e2e.items():
        print(f"  end-to-end training on CPU, {name}: {value:6.2f} images/s")
    result = {f"{k}_ms_per_image": v for k, v in best.items()}
    result.update({f"device_stage_{k}_ms_per_image": v for k, v in device_ms.items()})
    result.update({f"train_{k}_images_per_s": v for k, v in e2e.items()}, speedup=speedup,
                  drafted_images=drafted, mean_megapixels=photos["mean_megapixels"])
    write_json(args.output_json, result)
    print(f"cpu-stage speed-up over DINO: {speedup:.2f}x")
    return result


if __name__ == "__main__":
    errors.run_main(main)
