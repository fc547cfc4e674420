"""Data-augmentation cost: DINO's multi-crop on grey images served as RGB vs as one channel.

    python bench/augmentation_speed.py                                   # the CPU table recipe
    python bench/augmentation_speed.py --global_crops_size 224 --local_crops_size 96 \
        --local_crops_number 8                                          # DINO's crop sizes

With `--num_workers 0` (the CPU recipes) the training process augments each batch itself, on
one core, between steps, so this cost adds to bench/train_throughput.py's step time. Both
paths draw the same random numbers and give identical crops (tests/test_dino_training.py);
the grey path is what main_dino_sparo.py uses for the built-in grey data sets. Fashion-MNIST
training images, one process, the two paths timed alternately in the same run.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main_dino_sparo as dino  # noqa: E402
import utils  # noqa: E402
from bench.train_throughput import describe_device  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("augmentation_speed", parents=[dino.get_args_parser()])
    parser.add_argument("--images", type=int, default=2000, help="Images augmented per path and round.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating timed rounds per path.")
    parser.add_argument("--output_json", default=None, help="Also write the results here.")
    parser.set_defaults(config=None, global_crops_size=28, local_crops_size=14, local_crops_number=2,
                        global_crops_scale=(0.3, 1.0), local_crops_scale=(0.1, 0.3))
    return parser


def time_path(dataset: torch.utils.data.Dataset, count: int) -> float:
    """Seconds per image to produce every crop of `count` images."""
    random.seed(0), torch.manual_seed(0)
    start = time.perf_counter()
    for index in range(count):
        dataset[index]
    return (time.perf_counter() - start) / count


def main(argv: List[str] | None = None) -> Dict[str, float]:
    args = utils.parse_args_with_config(get_args_parser(), argv)
    transform = dino.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale,
                                          args.local_crops_number, args.global_crops_size,
                                          args.local_crops_size)
    datasets = {grey: utils.build_dataset("fashion_mnist", "pretrain", transform, subset=args.images,
                                          grey=grey) for grey in (False, True)}
    count = len(datasets[True])
    timings: Dict[bool, List[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for grey, dataset in datasets.items():
            timings[grey].append(time_path(dataset, count))
    rgb, grey = min(timings[False]), min(timings[True])  # best round: least disturbed
    print(f"device: {describe_device(torch.device('cpu'))}; torch {torch.__version__}")
    print(f"crops: 2x{args.global_crops_size}px + {args.local_crops_number}x{args.local_crops_size}px, "
          f"{count} Fashion-MNIST images, best of {args.rounds} rounds")
    print(f"       rgb: {rgb * 1e3:7.3f} ms/image")
    print(f"      grey: {grey * 1e3:7.3f} ms/image")
    print(f"grey/rgb time ratio: {grey / rgb:.3f}")
    result = dict(rgb_ms_per_image=rgb * 1e3, grey_ms_per_image=grey * 1e3, ratio=grey / rgb)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    utils.run_main(main)
