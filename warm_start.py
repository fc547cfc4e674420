"""Warm start of a pre-training run from released DINO weights (README, "Warm start from DINO
weights"): `main_dino_sparo.py --init_backbone FILE [--freeze_backbone_epochs N]`."""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch
from torch import nn

import errors
import utils
import vision_transformer as vits
import weight_files


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init_backbone", default=None, type=str,
                        help="Start from these backbone weights (an official DINO checkpoint or "
                             "backbone-only file, export.py's files, or this project's "
                             "checkpoint): embeddings, the blocks kept and the final norm are "
                             "loaded, the SPARO read-out and the head start fresh. Not re-applied "
                             "when the run resumes.")
    parser.add_argument("--init_checkpoint_key", default="teacher", type=str,
                        help="Which weights of a full checkpoint --init_backbone uses (teacher or student).")
    parser.add_argument("--freeze_backbone_epochs", default=0, type=utils.non_negative_int,
                        help="Train only the read-out and the DINO head for this many epochs "
                             "(with --init_backbone: adapt SPARO to the loaded backbone first).")


def init_backbone(backbone: nn.Module, path: str, checkpoint_key: str = "teacher") -> Dict[str, List[str]]:
    """Load the DINO backbone parts of `path` into `backbone`; returns the names loaded,
    dropped and freshly initialised. Any other mismatch is a one-line UserError."""
    state, _, _, dropped_head = weight_files.read_backbone(path, checkpoint_key, f"--init_backbone {path}",
                                                           "--init_checkpoint_key")
    own = backbone.state_dict()
    replaced = _replaced_block(backbone)
    load: Dict[str, torch.Tensor] = {}
    dropped_blocks, dropped_readout, unexpected, wrong_shape, notes = [], [], [], [], []
    for key, value in state.items():
        if key.startswith(vits.READOUT_MODULES):  # the read-out always starts fresh
            dropped_readout.append(key)
        elif key not in own:
            # only the block SPARO replaces may be left out: any other is a depth mismatch
            is_extra_block = key.startswith("blocks.") and int(key.split(".")[1]) == replaced
            (dropped_blocks if is_extra_block else unexpected).append(key)
        elif key == "pos_embed" and value.shape != own[key].shape and value.shape[-1] == own[key].shape[-1]:
            load[key] = vits.resample_pos_embed(value, backbone.pos_grid)
            notes.append(f"pos_embed resampled from {_grid(value)} to {_grid(own[key])}")
        elif value.shape != own[key].shape:
            wrong_shape.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            load[key] = value
    fresh = [k for k in own if k.startswith(vits.READOUT_MODULES)]
    missing = [k for k in own if k not in load and k not in fresh]
    problems = weight_files.fit_problems(wrong_shape, missing, unexpected)
    if problems:
        raise errors.UserError(f"--init_backbone {path} does not fit this backbone; {'; '.join(problems)}")
    backbone.load_state_dict(load, strict=False)
    report = dict(loaded=sorted(load), dropped=dropped_blocks + dropped_readout + dropped_head,
                  fresh=fresh)
    print(_summary(path, report, dropped_blocks, dropped_readout, dropped_head, notes))
    return report


def _replaced_block(backbone: nn.Module) -> Optional[int]:
    """Index of the DINO block whose place the SPARO read-out took (None: every block kept)."""
    config = backbone.config
    return config.num_blocks if config.num_blocks < vits.ARCHS[config.arch][1] else None


def _grid(pos_embed: torch.Tensor) -> str:
    side = int(round((pos_embed.shape[1] - 1) ** 0.5))
    return f"{side}x{side}"


def _block_numbers(keys: List[str]) -> str:
    numbers = sorted({int(k.split(".")[1]) for k in keys if k.startswith("blocks.")})
    return f"blocks {numbers[0]}-{numbers[-1]}" if numbers else "no blocks"


def _summary(path: str, report: Dict[str, List[str]], dropped_blocks: List[str],
             dropped_readout: List[str], dropped_head: List[str], notes: List[str]) -> str:
    loaded = report["loaded"]
    others = sorted({k.split(".")[0] for k in loaded if not k.startswith("blocks.")})
    lines = [f"Warm start from {path}: loaded {len(loaded)} tensors "
             f"({_block_numbers(loaded)}, {', '.join(others)})" + (f"; {'; '.join(notes)}" if notes else "")]
    if dropped_blocks:
        lines.append(f"  dropped {len(dropped_blocks)} tensors of {_block_numbers(dropped_blocks)} "
                     f"(the SPARO read-out takes the last block's place)")
    if dropped_readout:
        lines.append(f"  dropped {len(dropped_readout)} read-out tensors of the file (the read-out starts fresh)")
    if dropped_head:
        lines.append(f"  dropped {len(dropped_head)} projection-head tensors (the DINO head starts fresh)")
    if report["fresh"]:
        lines.append(f"  initialised fresh: {len(report['fresh'])} read-out tensors and the DINO head")
    else:
        lines.append("  initialised fresh: the DINO head")
    return "\n".join(lines)


def is_frozen(name: str) -> bool:
    """Backbone parameters other than a learned read-out (SPARO, cls_proj; names as in
    MultiCropWrapper)."""
    parts = name.split(".")
    return "backbone" in parts and not any(module.rstrip(".") in parts for module in vits.READOUT_MODULES)


def cancel_gradients_frozen_backbone(epoch: int, model: nn.Module, freeze_epochs: int) -> None:
    """During the first `freeze_epochs` epochs only the read-out and the head learn.

    The frozen parameters keep requires_grad=True and only lose their gradients before the
    optimiser step (as DINO freezes its last layer): DDP then reduces the same parameters in
    every epoch (no re-wrapping when they thaw, no unused-parameter errors), and the optimiser
    skips a parameter without a gradient entirely (no step, no weight decay, no moment
    estimates until it thaws). The price is the backbone's backward pass during those epochs.
    """
    utils.cancel_gradients(epoch, model, freeze_epochs, is_frozen)
