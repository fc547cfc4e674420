"""Export a trained backbone for use outside this repository: model.safetensors + config.json
(timm's layout) and backbone.pth (DINO's) in --output_dir, each checked to give the
checkpoint's features (README, "Export"; portable.py writes them).

    python export.py --pretrained_weights out/checkpoint.pth --output_dir export/
    python export.py --pretrained_weights out/checkpoint.pth --checkpoint_key student --output_dir export_student/
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

import torch
from safetensors import SafetensorError

import errors
import features as feats
import portable
import utils
import weight_files


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export a SPARO-DINO backbone", add_help=False)
    feats.add_weights_args(parser, required=True, checks=False)
    parser.add_argument("--output_dir", required=True, type=str,
                        help="Folder for model.safetensors, config.json and backbone.pth.")
    return parser


def probe_images(img_size: int) -> torch.Tensor:
    return torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def check_finite_features(model: torch.nn.Module, what: str) -> None:
    """Refuse, before anything is written, a backbone whose features are NaN or inf (a
    diverged run): its export would load and give NaN everywhere."""
    if not torch.isfinite(model(probe_images(model.config.img_size))).all():
        raise errors.UserError(f"{what} gives non-finite features (NaN or inf): nothing exported; "
                               f"export an earlier checkpoint of the run")


@torch.no_grad()
def check_round_trip(model: torch.nn.Module, path: Path, img_size: int) -> float:
    """Largest feature difference between the model and the file loaded back (should be 0;
    nan, which no `== 0` check passes, when either gives a non-finite feature)."""
    loaded, _ = weight_files.load_backbone(str(path))
    images = probe_images(img_size)
    return float((model(images) - loaded.eval()(images)).abs().max())


def main(argv: Optional[List[str]] = None) -> None:
    feats.run_script("Export a SPARO-DINO backbone", get_args_parser, export, argv)


def export(args: argparse.Namespace) -> None:
    model = feats.frozen_model(args, torch.device("cpu")).model
    check_finite_features(model, f"{args.pretrained_weights} ({args.checkpoint_key})")
    output_dir = utils.ensure_output_dir(args.output_dir, "--output_dir")
    source = {"checkpoint": Path(args.pretrained_weights).name, "checkpoint_key": args.checkpoint_key}
    try:
        paths = portable.write_export(model, output_dir, source)
    except (OSError, RuntimeError, SafetensorError) as error:  # a full disk, a read-only folder
        raise errors.UserError(f"cannot write the export into {output_dir}: "
                               f"{getattr(error, 'strerror', None) or errors.capped(str(error), 200)}; "
                               f"the files already there are unchanged") from error
    for kind in ("safetensors", "pth"):
        difference = check_round_trip(model, paths[kind], model.config.img_size)
        if not difference == 0:
            raise errors.UserError(f"{paths[kind]} does not reproduce the checkpoint's features "
                                   f"(max difference {difference:.3g})")
    print(f"Exported {portable.timm_name(model.config)} to {output_dir}: "
          f"{', '.join(p.name for p in paths.values())} (features checked: identical)")


if __name__ == "__main__":
    errors.run_main(main)
