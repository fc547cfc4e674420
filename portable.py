"""The portable form of a trained backbone, written by export.py (README, "Export"):
`model.safetensors` + `config.json` (timm's layout) and a DINO-style backbone-only `.pth`.
weight_files.read_backbone reads them back."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import save_file

import timm_models
import utils
import vision_transformer as vits
import weight_files

SAFETENSORS_NAME = "model.safetensors"
CONFIG_NAME = weight_files.EXPORT_CONFIG_NAME
PTH_NAME = "backbone.pth"
METADATA_KEY = weight_files.SAFETENSORS_METADATA_KEY
PRETRAINED_CFG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "num_classes",
                       "first_conv", "classifier")


def timm_name(config: vits.BackboneConfig) -> str:
    """The timm name that builds this BackboneConfig (timm_models.py), e.g.
    vit_small_patch16_224_sparo; the image size and read-out settings travel as model_args."""
    return timm_models.registered_name(config) or timm_models.variant_name(
        config.arch, config.patch_size, config.img_size, config.readout)


def export_config(config: vits.BackboneConfig, source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """config.json of a BackboneConfig: timm's hub layout (architecture, num_classes,
    num_features, pretrained_cfg, model_args) plus this project's model_config and the read-out
    spelled out."""
    embed_dim, depth, num_heads = vits.ARCHS[config.arch]
    readout: Dict[str, Any] = {"type": config.readout}
    if config.readout == "sparo":
        readout.update(L=config.sparo_slots, V=config.sparo_dim, a=config.attn_dim,
                       share_kv=config.sparo_share_kv, norm=config.sparo_norm,
                       keep_all_blocks=config.sparo_keep_all_blocks)
    elif config.readout == "cls_proj":  # CLS -> Linear(D, L*V) -> L2 norm: only the width matters
        readout.update(width=config.num_features)
    model_config = config.to_dict()
    return {
        "architecture": timm_name(config),
        "num_classes": 0,
        "num_features": config.num_features,
        "backbone": {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
                     "patch_size": config.patch_size, "mlp_ratio": 4.0, "qkv_bias": True},
        "readout": readout,
        "pretrained_cfg": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in timm_models.pretrained_cfg_for(config.img_size).items()
                           if k in PRETRAINED_CFG_KEYS},
        "model_args": {k: v for k, v in model_config.items() if k not in ("arch", "readout")},
        "model_config": model_config,
        "source": source or {},
    }


def backbone_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Contiguous CPU copies of the backbone's tensors (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def write_export(model: torch.nn.Module, output_dir: Path,
                 source: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
    """Write model.safetensors, config.json and backbone.pth of a backbone into output_dir, as
    a set: all three go to temporary files first (utils.replacing), then are renamed, the
    weights before config.json, so that a kill never leaves a config.json beside weights it
    does not describe (between two renames the weights are new and config.json old:
    weight_files.config_json_mismatch notices). Write errors are left to the caller."""
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = export_config(model.config, source)
    state = backbone_state(model)
    paths = {"safetensors": output_dir / SAFETENSORS_NAME, "config": output_dir / CONFIG_NAME,
             "pth": output_dir / PTH_NAME}
    with contextlib.ExitStack() as stack:  # renamed on leaving, the last entered first
        staged = {kind: stack.enter_context(utils.replacing(paths[kind], failures=()))
                  for kind in ("config", "pth", "safetensors")}
        save_file(state, str(staged["safetensors"]), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
        # DINO's released files are bare backbone state dicts; model_config (plain values) rides
        # along so that settings the shapes cannot tell (sparo_norm) survive. DINO's own loader
        # (load_state_dict(strict=False)) ignores that key.
        with open(staged["pth"], "wb") as handle:
            torch.save({**state, "model_config": meta["model_config"]}, handle)
        staged["config"].write_text(json.dumps(meta, indent=2) + "\n")
        shutil.copymode(staged["config"], staged["safetensors"])  # safetensors creates it private (0600)
    return paths
