"""Pre-training's data-loader throughput on real JPEGs, for both augmentation pipelines:

    cpu     DINO's whole augmentation in the loader workers (--augment_on_device false)
    device  geometry only in the workers (uint8 crops), the photometric stage on the training
            device in the main process (--augment_on_device true, the default with CUDA)

    python bench/loader_speed.py                          # 1,000 JPEGs, 10 and 14 workers, DINO's crops
    python bench/loader_speed.py --photos_dir DIR --workers 4 8 --device cpu

The JPEGs are cut from scikit-learn's sample photographs at ImageNet-like sizes
(bench/augmentation_speed.write_photos) into a temporary folder, or into --photos_dir when it
does not exist yet (an existing --photos_dir is loaded as it is). The loader
is training's own (main_dino_sparo.build_data_loader: its data set, transform, batch size,
workers, pinned memory on CUDA), drawing --passes passes over the photos without restarting its
workers. The consumer moves every batch to the device and, for the device pipeline, runs the
stage there, synchronised: both pipelines deliver training-ready crops.

Images/s are the steady state of the workers: batch i comes from worker i mod W, so batches 0
and m*W come from worker 0, m of its batches apart, and m*W*B images over the time between them
is the rate all W workers sustain; the workers' start-up (the wait for batch 0) is reported apart.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import augmentations  # noqa: E402
import config_files  # noqa: E402
import devices  # noqa: E402
import errors  # noqa: E402
import main_dino_sparo as dino  # noqa: E402
import utils  # noqa: E402
from bench.augmentation_speed import write_photos  # noqa: E402
from bench.measure import bench_device, describe_device, header, synchronize, write_json  # noqa: E402

PIPELINES = ("cpu", "device")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("loader_speed")
    parser.add_argument("--photos_dir", default=None,
                        help="A folder of images to load; written first (--photos JPEGs) if it does not "
                             "exist. Default: --photos JPEGs in a temporary folder.")
    parser.add_argument("--photos", type=utils.positive_int, default=1000, help="JPEGs written without --photos_dir.")
    parser.add_argument("--workers", type=utils.positive_int, nargs="+", default=[10, 14],
                        help="Loader worker counts to time (DINO: 10 per GPU).")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--batch_size_per_gpu", type=utils.positive_int, default=64)
    parser.add_argument("--global_crops_size", type=utils.positive_int, default=224)
    parser.add_argument("--local_crops_size", type=utils.positive_int, default=96)
    parser.add_argument("--local_crops_number", type=utils.non_negative_int, default=8)
    parser.add_argument("--passes", type=utils.positive_int, default=3,
                        help="Passes over the photos per measurement (one loader, workers kept).")
    parser.add_argument("--device", default="auto", choices=devices.DEVICE_CHOICES)
    parser.add_argument("--output_json", default=None)
    return parser


def training_args(args: argparse.Namespace, folder: Path, pipeline: str, workers: int) -> argparse.Namespace:
    """The arguments a training run on `folder` would have (main_dino_sparo's parser)."""
    flags = ["--data_path", str(folder), "--batch_size_per_gpu", str(args.batch_size_per_gpu),
             "--global_crops_size", str(args.global_crops_size), "--local_crops_size", str(args.local_crops_size),
             "--local_crops_number", str(args.local_crops_number), "--num_workers", str(workers),
             "--augment_on_device", str(pipeline == "device").lower()]
    train_args = argparse.ArgumentParser(parents=[dino.get_args_parser()]).parse_args(flags)
    train_args.rank, train_args.world_size, train_args.device = 0, 1, args.device
    return train_args


def measure(train_args: argparse.Namespace, passes: int) -> Dict[str, float]:
    """Steady-state images/s and start-up seconds of training's loader (module docstring)."""
    dataset = dino.build_data_loader(train_args).dataset
    loader = torch.utils.data.DataLoader(  # build_data_loader's loader, over `passes` passes
        dataset, batch_size=train_args.batch_size_per_gpu, num_workers=train_args.num_workers,
        sampler=torch.utils.data.RandomSampler(dataset, num_samples=passes * len(dataset)),
        pin_memory=train_args.device.type == "cuda", drop_last=True)
    workers = train_args.num_workers
    if len(loader) <= workers:
        raise errors.UserError(f"{len(loader)} batches cannot time {workers} workers: give more --photos or --passes")
    stage = augmentations.PhotometricAugmentation(train_args.local_crops_number, train_args.global_crops_size) \
        if train_args.augment_on_device else None
    non_blocking = train_args.device.type == "cuda"
    arrivals: List[float] = []
    start = time.perf_counter()
    for images, _ in loader:
        crops = [crop.to(train_args.device, non_blocking=non_blocking) for crop in images]
        if stage is not None:
            crops = stage(crops)
        synchronize(train_args.device)
        arrivals.append(time.perf_counter())
    cycles = (len(arrivals) - 1) // workers  # worker 0's batches after its first
    images = cycles * workers * train_args.batch_size_per_gpu
    return dict(images_per_s=images / (arrivals[cycles * workers] - arrivals[0]),
                startup_s=arrivals[0] - start, batches=len(arrivals), timed_images=images)


def main(argv: List[str] | None = None) -> Dict:
    args = config_files.parse_args_with_config(get_args_parser(), argv)
    args.device = bench_device(args.device)
    devices.enable_fast_fp32(args.device)  # cudnn.benchmark for the stage's blurs, as in training
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.photos_dir or scratch)
        if not args.photos_dir or not folder.exists():
            # written beside, then renamed: an interrupted run leaves no half-written folder
            partial = Path(scratch) / "photos" if not args.photos_dir else folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            start = time.perf_counter()
            photos = write_photos(partial, args.photos)
            folder = partial.rename(folder) if args.photos_dir else partial
            print(f"wrote {photos['count']} JPEGs (mean {photos['mean_megapixels']:.3f} Mpixel) "
                  f"in {time.perf_counter() - start:.1f} s")
        print(f"{header(args.device)}; crops 2x{args.global_crops_size}px + "
              f"{args.local_crops_number}x{args.local_crops_size}px, batch {args.batch_size_per_gpu}, "
              f"{args.passes} passes per measurement")
        results: Dict[str, Dict[str, float]] = {}
        for workers in args.workers:
            for pipeline in args.pipelines:
                name = f"{pipeline}_{workers}w"
                results[name] = measure(training_args(args, folder, pipeline, workers), args.passes)
                print(f"{pipeline:>6} pipeline, {workers:2d} workers: {results[name]['images_per_s']:8.1f} images/s "
                      f"(start-up {results[name]['startup_s']:.1f} s, {results[name]['timed_images']} images timed)",
                      flush=True)
    summary = dict(device=describe_device(args.device), torch=torch.__version__, cpu=devices.cpu_name(),
                   config=utils.plain(vars(args)), results=results)
    write_json(args.output_json, summary)
    return summary


if __name__ == "__main__":
    errors.run_main(main)
