"""See what each SPARO slot attends to: one PNG grid per image (for a CLS, gap or cls_proj
checkpoint, DINO's per-head CLS attention of the last block); README, "Attention maps of one
image", explains the panels. Method: ../shared/SPARO.md ("Visualisation").

    python visualize_slots.py --pretrained_weights OUT/checkpoint.pth --image_path IMG --output_dir VIS
    python visualize_slots.py --pretrained_weights OUT/checkpoint.pth --image_path FOLDER --top_k 8 --threshold 0.6
    python visualize_slots.py --pretrained_weights dino_deitsmall16_pretrain.pth --image_path IMG
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

import datasets
import devices
import errors
import features as feats
import utils
from slot_drawing import (CONTOUR_COLOR, compose_grid, describe_model, display_size, heat_overlay,
                          mask_contour, patch_entropy, titled, upsample_nearest)

OUTPUT_SUFFIXES = ("_slots.png", "_heads.png")   # grid file names: SPARO, CLS read-out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Visualize SPARO slots", add_help=False)
    feats.add_weights_args(parser, required=True)
    parser.add_argument("--image_path", required=True, type=str,
                        help="An image, or a folder of images (searched recursively).")
    parser.add_argument("--image_size", default=None, type=utils.positive_int, nargs="+",
                        help="Network input size. One value: the shorter side, aspect ratio kept; "
                             "two values: height width. Each side is rounded to a multiple of the "
                             "patch size. Default: the resolution the model was trained at.")
    parser.add_argument("--output_dir", default=".", type=str, help="Where to write the PNG grids.")
    parser.add_argument("--threshold", default=None, type=float,
                        help="Outline the smallest set of patches that holds this fraction of a "
                             "map's attention over the patches (DINO's rule; e.g. 0.6).")
    parser.add_argument("--slots", default=None, type=str,
                        help="Show these slots, e.g. 0,5,9 (0-based, in this order; the same "
                             "format as eval_knn.py). Default: every slot.")
    parser.add_argument("--top_k", default=None, type=utils.positive_int,
                        help="Show the K slots with the most concentrated attention (lowest "
                             "entropy over the patches) for each image, most concentrated first; "
                             "with --slots, the K best among those.")
    parser.add_argument("--display_size", default=224, type=utils.positive_int,
                        help="Shorter side of each panel in pixels; small images are upscaled so "
                             "the heat maps stay readable.")
    parser.add_argument("--columns", default=8, type=utils.positive_int, help="Panels per row of the grid.")
    return parser


# ============================================================================ attention maps
@dataclass
class AttentionMaps:
    """Attention of several queries (slots or heads) of one image over its tokens."""
    labels: List[str]          # panel names, e.g. "slot 3" or "head 0"
    patches: np.ndarray        # (K, h, w) weight on each patch (row-major patch grid)
    cls_weight: np.ndarray     # (K,) weight on the CLS token

    @property
    def entropy(self) -> np.ndarray:
        return patch_entropy(self.patches.reshape(len(self.patches), -1))

    def take(self, order: Sequence[int]) -> "AttentionMaps":
        order = list(order)
        return AttentionMaps([self.labels[i] for i in order], self.patches[order],
                             self.cls_weight[order])


@torch.inference_mode()
def attention_maps(model: torch.nn.Module, image: torch.Tensor) -> AttentionMaps:
    """Every slot's attention (SPARO) or every head's CLS attention (CLS read-out) for one
    normalised image (1, 3, H, W)."""
    grid = (image.shape[-2] // model.patch_size, image.shape[-1] // model.patch_size)
    if model.sparo is not None:
        weights = model.get_slot_attention(image)[0]              # (L, N): one row per slot
        labels = [f"slot {i}" for i in range(len(weights))]
    else:
        weights = model.get_last_selfattention(image)[0, :, 0]    # (heads, N): the CLS query
        labels = [f"head {i}" for i in range(len(weights))]
    weights = weights.float().cpu().numpy()
    return AttentionMaps(labels, weights[:, 1:].reshape(len(weights), *grid), weights[:, 0])


def threshold_mask(patch_weights: np.ndarray, fraction: float) -> np.ndarray:
    """The smallest set of patches of each row holding `fraction` of its patch attention mass.

    Patches are taken from the heaviest down until the mass reaches the fraction (DINO's
    visualize_attention.py rule). patch_weights: (K, P); returns a boolean (K, P) mask.
    """
    p = patch_weights / np.maximum(patch_weights.sum(axis=-1, keepdims=True), 1e-30)
    order = np.argsort(-p, axis=-1, kind="stable")
    mass_before = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1) - \
        np.take_along_axis(p, order, axis=-1)
    keep_sorted = mass_before < fraction
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask


def select_maps(maps: AttentionMaps, slots: Optional[Sequence[int]],
                top_k: Optional[int]) -> AttentionMaps:
    """The slots given by --slots (in order), optionally narrowed to the top_k most
    concentrated ones (lowest patch entropy first)."""
    order = list(dict.fromkeys(slots)) if slots else list(range(len(maps.labels)))
    if top_k:
        entropy = maps.entropy
        order = sorted(order, key=lambda i: (entropy[i], i))[:top_k]
    return maps.take(order)


# ================================================================================ images
def list_images(image_path: str, output_dir: Optional[str] = None) -> List[Path]:
    """One image, or every image under a folder (sorted), leaving out grids this script wrote
    into output_dir (so a second run does not draw the grids of the first)."""
    path = Path(image_path)
    if not path.exists():
        raise errors.UserError(f"--image_path {image_path} does not exist")
    if path.is_file():
        return [path]
    skip = Path(output_dir).resolve() if output_dir else None
    return feats.images_under(image_path, "--image_path", lambda p: bool(
        skip and p.resolve().is_relative_to(skip) and p.name.endswith(OUTPUT_SUFFIXES)))


def open_image(path: Path):
    try:
        return datasets.load_rgb_image(str(path))
    except Exception as error:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise errors.UserError(f"cannot read image {path}: {error}") from error


def input_size(width: int, height: int, image_size: Optional[Sequence[int]],
               patch_size: int) -> Tuple[int, int]:
    """(height, width) of the network input: the requested size with each side rounded to
    the nearest multiple of the patch size (at least one patch)."""
    if len(image_size) == 1:
        scale = image_size[0] / min(width, height)
        target = (height * scale, width * scale)
    else:
        target = (image_size[0], image_size[1])
    return tuple(max(patch_size, int(round(side / patch_size)) * patch_size) for side in target)


def to_network_input(image, size: Tuple[int, int]) -> torch.Tensor:
    """A PIL image resized to size (height, width), as a normalised (1, 3, H, W) tensor."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])
    return transform(image).unsqueeze(0)


# ================================================================================ drawing


def map_panels(image: np.ndarray, maps: AttentionMaps, threshold: Optional[float]) -> List:
    """One titled heat-map panel per map; with a threshold, its mask outlined in red."""
    masks = None
    if threshold is not None:
        masks = threshold_mask(maps.patches.reshape(len(maps.patches), -1), threshold)
        masks = masks.reshape(maps.patches.shape)
    entropy = maps.entropy
    panels = []
    for i, label in enumerate(maps.labels):
        panel = heat_overlay(image, maps.patches[i])
        if masks is not None:
            panel[mask_contour(upsample_nearest(masks[i], *image.shape[:2]))] = CONTOUR_COLOR
            label += f"  ({threshold:.0%} in {int(masks[i].sum())} patches)"
        panels.append(titled(panel, [label, f"CLS {maps.cls_weight[i]:.3f}  H {entropy[i]:.2f}"]))
    return panels


# ================================================================================= script
def check_args(args: argparse.Namespace) -> None:
    """Refuse options out of range, with one clear line each, before the model is loaded."""
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise errors.UserError(f"--threshold is a fraction of the attention mass in (0, 1], got {args.threshold}")
    if args.image_size is not None and len(args.image_size) > 2:
        raise errors.UserError("--image_size takes one positive value (shorter side) or two (height width)")
    if args.display_size < 32:
        raise errors.UserError(f"--display_size must be at least 32, got {args.display_size}")


def output_name(path: Path, root: Path, readout: str) -> str:
    """A file name per image; images in sub-folders keep their relative path in the name."""
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(relative.with_suffix("")))
    return stem + OUTPUT_SUFFIXES[0 if readout == "sparo" else 1]


def output_names(paths: Sequence[Path], root: Path, readout: str) -> List[str]:
    """output_name of every image, made unique: images whose names meet after the extension is
    dropped and odd characters are replaced (cat.jpg and cat.png, `a b.png` and a_b.png, ä.png
    and ö.png), also in letter case, get a short hash of their own relative path added, so
    that no grid overwrites another."""
    names = [output_name(path, root, readout) for path in paths]
    meets = Counter(name.casefold() for name in names)
    for i, (path, name) in enumerate(zip(paths, names)):
        if meets[name.casefold()] > 1:
            relative = path.relative_to(root) if root.is_dir() else Path(path.name)
            tag = hashlib.sha256(os.fsencode(relative)).hexdigest()[:8]
            suffix = OUTPUT_SUFFIXES[0 if readout == "sparo" else 1]
            names[i] = f"{name[:-len(suffix)]}_{tag}{suffix}"
    if len({name.casefold() for name in names}) < len(names):  # a hash that meets another name
        raise errors.UserError(f"--image_path {root}: the images' grid names collide even with a hash "
                               f"added; rename the images")
    return names


def visualize_image(model: torch.nn.Module, config: dict, path: Path,
                    args: argparse.Namespace, slots: Optional[List[int]] = None):
    """The PNG grid of one image, as a PIL image."""
    image = open_image(path)
    size = input_size(image.width, image.height, args.image_size or [config["img_size"]],
                      config["patch_size"])
    device = next(model.parameters()).device
    maps = attention_maps(model, to_network_input(image, size).to(device))
    if config["readout"] == "sparo":
        maps = select_maps(maps, slots, args.top_k)

    shown_h, shown_w = display_size(size, args.display_size)
    shown = np.asarray(image.resize((shown_w, shown_h), resample=Image.Resampling.BICUBIC))
    grid_h, grid_w = maps.patches.shape[1:]
    panels = [titled(shown, [path.name, f"{size[1]}x{size[0]} px, {grid_w}x{grid_h} patches"])]
    panels += map_panels(shown, maps, args.threshold)
    what = "slot" if config["readout"] == "sparo" else "CLS-query head (last block)"
    header = [f"{path.name}: {describe_model(config)}, {len(maps.labels)} {what} attention maps",
              f"CLS: weight on the CLS token. H: entropy over the patches in nats "
              f"(uniform: {math.log(grid_h * grid_w):.2f})."]
    if args.threshold is not None:
        header.append(f"Red outline: the fewest patches holding {args.threshold:.0%} of the "
                      f"attention over the patches.")
    return compose_grid(panels, header, args.columns)


def main(argv: Optional[List[str]] = None) -> None:
    feats.run_script("Visualize SPARO slots", get_args_parser, visualize, argv)


def visualize(args: argparse.Namespace) -> None:
    # ============ checking the inputs ... ============
    check_args(args)
    images = list_images(args.image_path, args.output_dir)
    utils.ensure_output_dir(args.output_dir, "--output_dir")

    # ============ building network ... ============
    device = torch.device("cuda" if devices.resolve_use_cuda("auto") else "cpu")  # no silent CPU on a GPU node
    model, config, slots = feats.frozen_model(args, device, slot_counts={"--top_k": args.top_k})

    # ============ drawing one grid per image ... ============
    output_dir = Path(args.output_dir)
    root = Path(args.image_path)
    for path, name in zip(images, output_names(images, root, config["readout"])):
        grid = visualize_image(model, config, path, args, slots)
        target = output_dir / name
        grid.save(target, optimize=True)
        print(f"{path} -> {target} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    errors.run_main(main)
