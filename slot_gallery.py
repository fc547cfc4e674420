"""What concept has each SPARO slot picked up? A gallery (slot_gallery.png) and a table per
slot (slot_stats.json) over a labelled data set; README, "What each slot encodes", explains
the columns. visualize_slots.py draws single images instead.

    python slot_gallery.py --pretrained_weights OUT/checkpoint.pth --output_dir GALLERY
    python slot_gallery.py --pretrained_weights OUT/checkpoint.pth --data_path /path/to/imagenet \
        --train_subset 50000 --test_subset 5000 --top_k 16 --output_dir GALLERY
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import errors
import features as feats
import knn
import slot_drawing as drawing
import utils

# Zalando's names of the Fashion-MNIST classes, in label order.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
ROW_LABEL_WIDTH = 150   # pixels left of each gallery row for the slot's numbers
GALLERY_ALPHA = 0.5     # lighter heat maps than visualize_slots.py: the images carry the concept


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SPARO slot gallery", add_help=False)
    feats.add_eval_args(parser, batch_size=128)
    parser.add_argument("--output_dir", default=".", type=str,
                        help="Where to write slot_gallery.png and slot_stats.json.")
    knn.add_knn_args(parser, [20], "k of the per-slot weighted k-NN (20: DINO's headline number). The "
                                   "first k is shown in the table and the gallery; slot_stats.json "
                                   "holds every k (knn_top1_by_k).")
    parser.add_argument("--images_per_slot", default=8, type=utils.positive_int,
                        help="Images shown in each slot's row.")
    parser.add_argument("--top_k", default=None, type=utils.positive_int,
                        help="Rows only for the K slots with the most concentrated attention "
                             "(lowest mean entropy), most concentrated first. The table keeps "
                             "every slot (or every --slots slot).")
    parser.add_argument("--thumbnail_size", default=64, type=utils.positive_int,
                        help="Side in pixels of each image in the gallery.")
    parser.add_argument("--show_attention", default=True, type=utils.bool_flag,
                        help="Draw the slot's attention over each image of its row.")
    return parser


# ======================================================================== per-slot numbers
def encoding_and_attention_stats(model: torch.nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The SPARO encoding (B, L*V), per slot the entropy of its attention over the patches
    (B, L), and per slot its weight on the CLS token (B, L)."""
    encoding, attention = model.sparo(model.forward_tokens(images), return_attention=True)
    return encoding, drawing.patch_entropy(attention[:, :, 1:].float()), attention[:, :, 0]


def unit_slot_vectors(encoding: torch.Tensor, num_slots: int, slot: int) -> torch.Tensor:
    """(N, V) slot `slot` of each (N, L*V) encoding, L2-normalised: the slot on its own."""
    return F.normalize(encoding.view(encoding.shape[0], num_slots, -1)[:, slot].float(), dim=1)


def mean_direction(vectors: torch.Tensor) -> tuple:
    """(unit mean direction, mean resultant length) of unit vectors (N, V)."""
    mean = vectors.mean(dim=0)
    length = float(mean.norm())
    return mean / max(length, 1e-12), length


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
             test_labels: torch.Tensor, args: argparse.Namespace) -> Dict[int, float]:
    """{k: weighted k-NN top-1} for every k of --nb_knn (one neighbour search)."""
    accuracy = knn.knn_evaluate(train, train_labels, test, test_labels, args.nb_knn,
                                args.temperature, backend=args.knn_backend)
    return {k: top1 for k, (top1, _) in accuracy.items()}


def slot_statistics(train_encoding: torch.Tensor, train_labels: torch.Tensor,
                    test_encoding: torch.Tensor, entropy: torch.Tensor, cls_weight: torch.Tensor,
                    test_labels: torch.Tensor, num_slots: int, slots: Sequence[int],
                    args: argparse.Namespace) -> List[Dict[str, Any]]:
    """One record per slot: numbers of the table and the test images nearest its mean direction."""
    k = args.nb_knn[0]
    records = []
    for slot in slots:
        test_vectors = unit_slot_vectors(test_encoding, num_slots, slot)
        direction, resultant = mean_direction(test_vectors)
        nearest = (test_vectors @ direction).topk(min(args.images_per_slot, len(test_vectors)))
        accuracy = knn_top1(unit_slot_vectors(train_encoding, num_slots, slot), train_labels,
                            test_vectors, test_labels, args)
        records.append(dict(slot=slot, entropy=float(entropy[:, slot].mean()),
                            cls_weight=float(cls_weight[:, slot].mean()), knn_top1=accuracy[k],
                            knn_top1_by_k={str(key): value for key, value in accuracy.items()},
                            mean_resultant_length=resultant,
                            nearest=nearest.indices.tolist(),
                            nearest_cosine=[round(float(c), 4) for c in nearest.values]))
        print(f"slot {slot}: {k}-NN top-1 {accuracy[k]:.2f}", flush=True)
    return records


def format_table(records: Sequence[Dict[str, Any]], k: int, all_slots_top1: float) -> str:
    lines = [f"{'slot':>5} {'entropy':>8} {'CLS weight':>11} {f'{k}-NN top-1':>12} {'resultant':>10}"]
    for r in records:
        lines.append(f"{r['slot']:>5} {r['entropy']:>8.3f} {r['cls_weight']:>11.4f} "
                     f"{r['knn_top1']:>12.2f} {r['mean_resultant_length']:>10.3f}")
    lines.append(f"{'all slots':>26} {all_slots_top1:>12.2f}")
    return "\n".join(lines)


# =============================================================================== drawing
def class_names(data_path: str, dataset: torch.utils.data.Dataset) -> List[str]:
    if data_path == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return [str(c) for c in getattr(base, "classes", [])]


def display_image(normalised: torch.Tensor, size: int) -> np.ndarray:
    """A normalised network input (3, H, W) back to uint8 RGB, resized to `size` on its
    shorter side."""
    mean = torch.tensor(utils.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(utils.IMAGENET_STD)[:, None, None]
    pixels = ((normalised.cpu() * std + mean).clamp(0, 1) * 255).round().byte()
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    height, width = drawing.display_size((image.height, image.width), size)
    return np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))


@torch.inference_mode()
def gallery_row(model: torch.nn.Module, dataset: torch.utils.data.Dataset, record: Dict[str, Any],
                names: List[str], k: int, args: argparse.Namespace):
    """One slot's row: its numbers, then its nearest images with the slot's attention."""
    device = next(model.parameters()).device
    items = [dataset[i] for i in record["nearest"]]
    images = torch.stack([image for image, _ in items])
    attention = model.get_slot_attention(images.to(device))[:, record["slot"]].float().cpu().numpy()
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    cells = []
    for (image, label), weights in zip(items, attention):
        shown = display_image(image, args.thumbnail_size)
        if args.show_attention:
            shown = drawing.heat_overlay(shown, weights[1:].reshape(grid), GALLERY_ALPHA)
        name = names[label] if label < len(names) else str(label)
        cells.append(drawing.titled(shown, [name]))
    cell_w, cell_h = max(c.width for c in cells), max(c.height for c in cells)
    row = Image.new("RGB", (ROW_LABEL_WIDTH + len(cells) * (cell_w + drawing.PAD), cell_h),
                    drawing.BACKGROUND)
    draw = ImageDraw.Draw(row)
    text = [f"slot {record['slot']}", f"{k}-NN top-1 {record['knn_top1']:.1f}%",
            f"H {record['entropy']:.2f}  CLS {record['cls_weight']:.3f}",
            f"resultant {record['mean_resultant_length']:.2f}"]
    for line, value in enumerate(text):
        draw.text((0, 2 + line * drawing.LINE_HEIGHT), value, fill=drawing.TEXT_COLOR, font=drawing.font())
    for index, cell in enumerate(cells):
        row.paste(cell, (ROW_LABEL_WIDTH + index * (cell_w + drawing.PAD), 0))
    return row


# ================================================================================ script
def check_args(args: argparse.Namespace) -> None:
    if args.thumbnail_size < 16:
        raise errors.UserError(f"--thumbnail_size must be at least 16, got {args.thumbnail_size}")
    utils.ensure_output_dir(args.output_dir, "--output_dir")
    if args.output_json:
        utils.ensure_output_file(args.output_json, "--output_json")


def slot_gallery(args: argparse.Namespace) -> Dict[str, Any]:
    feats.start(args)
    check_args(args)
    args.knn_backend = knn.resolve_backend(args.knn_backend, torch.device("cpu"))  # once, for every slot
    model, config, slots = feats.frozen_model(args, args.device, sparo_only="slot_gallery.py",
                                              slot_counts={"--top_k": args.top_k})
    evaluation = feats.labelled_splits(args, config)
    feats.check_bank_size(args.nb_knn, len(evaluation.train))
    crop, dataset_train, dataset_test = evaluation.crop_size, evaluation.train, evaluation.test
    num_slots = int(config["sparo_slots"])
    slots = slots or list(range(num_slots))
    k = args.nb_knn[0]

    # ============ extracting features and attention statistics ... ============
    common = dict(feats.run_settings(args), storage_device=torch.device("cpu"))
    print("Extracting features for train set...")
    train_encoding = feats.extract_features(model, dataset_train, **common)
    print("Extracting features and slot attention for test set...")
    test_encoding, entropy, cls_weight = feats.extract_features(
        lambda x: encoding_and_attention_stats(model, x), dataset_test, **common)

    # ============ per-slot statistics and k-NN ... ============
    all_slots_top1 = knn_top1(F.normalize(train_encoding, dim=1), evaluation.train_labels,
                              F.normalize(test_encoding, dim=1), evaluation.test_labels, args)[k]
    records = slot_statistics(train_encoding, evaluation.train_labels, test_encoding, entropy,
                              cls_weight, evaluation.test_labels, num_slots, slots, args)
    grid = (crop // config["patch_size"]) ** 2
    summary = dict(pretrained_weights=args.pretrained_weights, checkpoint_key=args.checkpoint_key,
                   data_path=args.data_path, num_train=len(dataset_train),
                   num_test=len(dataset_test), image_size=crop, k=k,
                   temperature=args.temperature, entropy_uniform=math.log(grid),
                   all_slots_knn_top1=all_slots_top1, slots=records)
    print(format_table(records, k, all_slots_top1))
    if not utils.is_main_process():
        return summary

    # ============ writing the table and the gallery ... ============
    output_dir = Path(args.output_dir)
    json_path = Path(args.output_json) if args.output_json else output_dir / "slot_stats.json"
    feats.write_json(str(json_path), summary)
    shown = records
    if args.top_k:
        shown = sorted(records, key=lambda r: (r["entropy"], r["slot"]))[:args.top_k]
    names = class_names(args.data_path, dataset_test)
    rows = [gallery_row(model, dataset_test, record, names, k, args) for record in shown]
    header = [f"Slot gallery: {drawing.describe_model(config)}, {args.data_path} test split "
              f"({len(dataset_test)} images, {crop} px).",
              f"Per slot: the {args.images_per_slot} images whose slot vectors lie closest to the "
              f"slot's mean direction" + (", with the slot's attention." if args.show_attention else "."),
              f"{k}-NN top-1: that slot alone (bank: {len(dataset_train)} train images); "
              f"all slots: {all_slots_top1:.1f}%.",
              f"H: mean entropy over the patches (uniform: {math.log(grid):.2f}); CLS: mean weight "
              f"on the CLS token; resultant: mean resultant length."]
    gallery = drawing.compose_grid(rows, header, columns=1)
    gallery.save(output_dir / "slot_gallery.png", optimize=True)
    print(f"Wrote {output_dir / 'slot_gallery.png'} ({gallery.width}x{gallery.height}, "
          f"{len(rows)} slots) and {json_path}")
    return summary


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return feats.run_script("SPARO slot gallery", get_args_parser, slot_gallery, argv)


if __name__ == "__main__":
    errors.run_main(main)
