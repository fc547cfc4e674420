"""Encode every image of a folder with a trained backbone (no labels needed); README,
"Embeddings of a folder", describes the output files.

    python embed.py --pretrained_weights out/checkpoint.pth --data_path photos/ --output emb.npy
    python embed.py --pretrained_weights export/model.safetensors --data_path photos/ --output emb.pt --per_slot true
    torchrun --nproc_per_node=8 embed.py --pretrained_weights ... --data_path ... --output emb.npy
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

import datasets
import errors
import features as feats
import utils

OUTPUT_SUFFIXES = (".npy", ".pt")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Encode a folder of images", add_help=False)
    feats.add_weights_args(parser, required=True, checks=False)
    parser.add_argument("--data_path", required=True, type=str,
                        help="A folder of images, searched recursively; labels are not needed.")
    parser.add_argument("--output", required=True, type=str,
                        help="FILE.npy (plus FILE.txt with the names) or FILE.pt (everything in one file).")
    parser.add_argument("--per_slot", default=False, type=utils.bool_flag,
                        help="SPARO only: write (N, L, V), the encoding split into its L slots "
                             "(each slot of norm 1/sqrt(L) with sparo_norm=slot).")
    feats.add_image_size_args(parser)
    feats.add_run_args(parser, batch_size=128)
    return parser


def list_images(root: str) -> List[Path]:
    if not Path(root).is_dir():
        raise errors.UserError(f"--data_path {root} is not a folder")
    return feats.images_under(root, "--data_path")


def image_files(files: List[Path], transform: Any, crop_size: int) -> torch.utils.data.Dataset:
    """The files, each labelled with its position; an unreadable one is an all-NaN image."""
    samples = [(str(path), position) for position, path in enumerate(files)]
    return datasets.NanForUnreadableImages(datasets.ImageFiles(samples, [], transform),
                                           (3, crop_size, crop_size))


def unreadable_reason(path: Path) -> str:
    try:
        datasets.load_rgb_image(str(path))
    except datasets.UNREADABLE_IMAGE_ERRORS as error:
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return "unreadable when encoded"


def encode(model: torch.nn.Module, dataset: torch.utils.data.Dataset, args: argparse.Namespace) -> Tuple[torch.Tensor, torch.Tensor]:
    """(encodings (N, D), readable (N,) bool) in data set order, on every process."""

    def forward(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        readable = torch.isfinite(images).flatten(1).all(dim=1)
        return model(torch.where(readable[:, None, None, None], images, torch.zeros_like(images))), readable

    return feats.extract_features(forward, dataset, storage_device=torch.device("cpu"),
                                  **feats.run_settings(args))


def write_output(path: Path, features: np.ndarray, names: List[str], unreadable: List[str],
                 config: Dict[str, Any]) -> List[Path]:
    """Write the encodings and return the files written. FILE.npy and its names FILE.txt are
    a pair: both are written to temporary files first (a full disk leaves both as they were),
    then renamed one right after the other, the names first."""
    if path.suffix == ".pt":
        utils.atomic_save(dict(features=torch.from_numpy(features), names=names, unreadable=unreadable,
                               model_config=config), path)
        return [path]
    written = [path, path.with_suffix(".txt")]
    with utils.replacing(path) as tmp:  # renamed after the names file, right after it
        np.save(tmp, features)
        utils.atomic_write_text(written[1], "".join(f"{name}\n" for name in names))
    listing = path.with_suffix(".unreadable.txt")
    if unreadable:
        utils.atomic_write_text(listing, "".join(f"{line}\n" for line in unreadable))
        written.append(listing)
    else:
        listing.unlink(missing_ok=True)  # from an earlier run over the same output
    return written


def check_names(names: List[str], output: Path) -> None:
    """FILE.txt holds one name per line: a name with a line break would shift every later
    name against its row of FILE.npy."""
    if output.suffix == ".pt":
        return
    broken = [name for name in names if "\n" in name or "\r" in name]
    if broken:
        raise errors.UserError(f"{len(broken)} image file name(s) contain a line break (e.g. "
                               f"{errors.shown(broken[0])}), which the one-name-per-line {output.with_suffix('.txt')} "
                               f"cannot hold: rename them, or use --output FILE.pt (names kept as a list)")


def check_args(args: argparse.Namespace) -> None:
    if Path(args.output).suffix not in OUTPUT_SUFFIXES:
        raise errors.UserError(f"--output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {args.output}")
    if utils.is_main_process():
        utils.ensure_output_file(args.output, "--output")


def embed(args: argparse.Namespace) -> None:
    feats.start(args)
    check_args(args)
    output = Path(args.output)
    model, config, _ = feats.frozen_model(args, args.device, sparo_only="--per_slot" if args.per_slot else "")
    crop = feats.eval_crop_size(args, config)
    files = list_images(args.data_path)
    check_names([p.relative_to(args.data_path).as_posix() for p in files], output)
    dataset = image_files(files, feats.eval_transform(crop, args.resize_size), crop)
    print(f"Encoding {len(files)} images from {args.data_path} at {crop} px.")
    features, readable = encode(model, dataset, args)
    if not utils.is_main_process():
        return
    root = Path(args.data_path)
    names = [p.relative_to(root).as_posix() for p in files]
    bad = [i for i in range(len(files)) if not readable[i]]
    unreadable = [f"{names[i]}\t{unreadable_reason(files[i])}" for i in bad]
    features = features[readable].numpy().astype(np.float32)
    if args.per_slot:
        features = features.reshape(len(features), int(config["sparo_slots"]), int(config["sparo_dim"]))
    kept = [name for i, name in enumerate(names) if readable[i]]
    written = write_output(output, features, kept, unreadable, config)
    for line in unreadable:
        print(f"Warning: unreadable image left out: {line}", file=sys.stderr, flush=True)
    print(f"Wrote {features.shape} encodings of {len(kept)} images to {', '.join(map(str, written))}"
          + (f"; {len(bad)} unreadable image(s) left out and listed" if bad else ""))


def main(argv: Optional[List[str]] = None) -> None:
    feats.run_script("Encode a folder of images", get_args_parser, embed, argv)


if __name__ == "__main__":
    errors.run_main(main)
