"""Weight files: the one reader (read_backbone) of this project's checkpoints, export.py's
safetensors files, bare backbone state dicts and official DINO files, and load_backbone, which
builds the backbone a file describes and loads it strictly."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors_file
from torch import nn

import vision_transformer as vits
from errors import UserError, capped, short_list


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Safe load (weights_only=True) with clear errors for missing, torn or foreign files.

    Official DINO checkpoints pickle an argparse.Namespace under `args`: that one class is
    allowed explicitly, nothing else.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means an unusable file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise UserError(f"checkpoint {path} is not a plain checkpoint and was refused by "
                            f"safe loading: {first_line}") from error
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a torch "
                        f"checkpoint): {first_line}") from error
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


SAFETENSORS_METADATA_KEY = "sparo_dino"  # the header entry of export.py's files with their config.json
EXPORT_CONFIG_NAME = "config.json"  # written beside them


def read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(tensors, model_config or None) of a .safetensors file; no code is run."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    state = load_safetensors_file(str(path), device="cpu")
    meta = metadata.get(SAFETENSORS_METADATA_KEY)
    return state, json.loads(meta).get("model_config") if meta else None


def config_json_mismatch(path: Path, model_config: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why the config.json beside an exported weight file does not describe it, or None: an
    export killed between its renames (or files copied from two exports) leaves a pair that
    would otherwise load without a word."""
    sibling = path.with_name(EXPORT_CONFIG_NAME)
    if model_config is None or not sibling.is_file():
        return None
    try:
        described = json.loads(sibling.read_text()).get("model_config")
    except (OSError, ValueError, AttributeError):
        described = "unreadable"
    if described == model_config:
        return None
    return (f"{sibling} does not describe {path} (another export, or one interrupted): export "
            f"again into an empty --output_dir, or delete {sibling}")


def _load_safetensors(path: Path) -> Dict[str, Any]:
    """An exported backbone (export.py): its tensors plus `model_config` from the header."""
    try:
        state, config = read_safetensors(path)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"checkpoint {path} cannot be read as safetensors: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from error
    mismatch = config_json_mismatch(path, config)
    if mismatch:
        raise UserError(mismatch)
    return {**state, "model_config": config} if config else state


def checkpoint_backbone(checkpoint: Dict[str, Any], checkpoint_key: str, what: str,
                        key_flag: str = "--checkpoint_key") -> Tuple[Dict[str, Any], str]:
    """(backbone state dict as stored, what it is) of a loaded file: the `checkpoint_key`
    weights of a training checkpoint, or a bare backbone (DINO's released files, export.py's)."""
    if isinstance(checkpoint.get(checkpoint_key), dict):
        return checkpoint[checkpoint_key], f"'{checkpoint_key}' weights"
    if all(isinstance(v, torch.Tensor) for k, v in checkpoint.items() if k != "model_config"):
        return {k: v for k, v in checkpoint.items() if k != "model_config"}, "backbone weights"
    keys = [k for k, v in checkpoint.items() if isinstance(v, dict)]
    raise UserError(f"{what} has no '{checkpoint_key}' weights (it holds: "
                    f"{', '.join(keys) or 'no state dicts'}); see {key_flag}")


def checkpoint_config(checkpoint: Dict[str, Any], state: Dict[str, torch.Tensor],
                      what: str = "the weight file") -> vits.BackboneConfig:
    """The BackboneConfig a file carries as `model_config`, else the one its backbone weights'
    shapes imply (official DINO files carry none)."""
    stored = checkpoint.get("model_config")
    if stored is None:
        try:
            return vits.BackboneConfig.from_state_dict(state)
        except ValueError as error:
            raise UserError(str(error)) from None
    if not isinstance(stored, dict):
        raise UserError(f"{what}: its model_config is a {type(stored).__name__}, not a mapping")
    try:
        return vits.BackboneConfig.from_dict(stored)
    except ValueError as error:
        raise UserError(f"{what}: its model_config is malformed: {capped(str(error), 300)}") from error


class BackboneWeights(NamedTuple):
    """A backbone read from a weight file."""

    state: Dict[str, torch.Tensor]  # the backbone's tensors under DINO's parameter names
    config: vits.BackboneConfig  # the file's model_config, else the one its shapes imply
    source: str  # what they are: "'teacher' weights" or "backbone weights"
    head: List[str]  # the projection head's tensors stored with the backbone, left out


def backbone_tensors(checkpoint: Dict[str, Any], checkpoint_key: str = "teacher", what: str = "the file",
                     key_flag: str = "--checkpoint_key") -> Tuple[Dict[str, torch.Tensor], List[str], str]:
    """(backbone tensors, projection-head tensors left out, what they are) of a loaded file: its
    `checkpoint_key` weights or its bare backbone, without DDP's `module.` and keeping the
    `backbone.` part of a student/teacher (MultiCropWrapper) state dict."""
    stored, source = checkpoint_backbone(checkpoint, checkpoint_key, what, key_flag)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in stored.items()}
    head: List[str] = []
    if any(k.startswith("backbone.") for k in state):
        head = [k for k in state if k.startswith("head.")]
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state, head, source


def read_backbone(path: str | Path, checkpoint_key: str = "teacher", what: Optional[str] = None,
                  key_flag: str = "--checkpoint_key") -> BackboneWeights:
    """The one reader of weight files: this project's checkpoints (student/teacher +
    model_config), export.py's files, bare backbone state dicts and official DINO files (bare,
    or full checkpoints with `args` as a Namespace). `what` names the file in errors."""
    checkpoint = load_checkpoint(path)
    state, head, source = backbone_tensors(checkpoint, checkpoint_key, what or str(path), key_flag)
    return BackboneWeights(state, checkpoint_config(checkpoint, state, what or str(path)), source, head)


def fit_problems(wrong_shape: List[str], missing: List[str], unexpected: List[str]) -> List[str]:
    """Why weights do not load strictly into a model, one phrase per kind of mismatch."""
    return [f"{what}: {short_list(keys)}" for what, keys in
            (("shape mismatch (file vs model)", wrong_shape), ("missing keys", missing),
             ("unexpected keys", unexpected)) if keys]


def check_state_fits(state: Dict[str, torch.Tensor], config: vits.BackboneConfig, path: str | Path) -> None:
    """A UserError unless `state` loads strictly into the backbone `config` describes. The model
    is built on the meta device: sizes read from a file are checked before anything is allocated."""
    with torch.device("meta"):
        own = config.build().state_dict()
    problems = fit_problems([f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                             if k in own and own[k].shape != v.shape],
                            [k for k in own if k not in state], [k for k in state if k not in own])
    if problems:
        raise UserError(f"{path} does not fit a {config.arch} readout={config.readout} backbone; "
                        f"{'; '.join(problems)}")


def load_backbone(pretrained_weights: str, checkpoint_key: str = "teacher",
                  expected: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a backbone and load a file's weights (read_backbone) into it strictly; returns
    (model, model_config dict). `expected` holds configuration values the caller asks for
    (e.g. arch, patch_size from the command line); one that differs from the file is an error,
    never a silent rebuild.
    """
    state, config, source, _ = read_backbone(pretrained_weights, checkpoint_key)
    disagreement = config.disagreement(expected or {})
    if disagreement:
        raise UserError(f"{pretrained_weights} {disagreement}")
    check_state_fits(state, config, pretrained_weights)
    model = config.build()
    model.load_state_dict(state)
    print(f"Loaded {source} from {pretrained_weights}: {config.arch}/{config.patch_size} readout={config.readout}")
    return model, config.to_dict()
