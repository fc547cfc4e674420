"""The portable form of a trained backbone: `model.safetensors` + `config.json` (timm's layout)
and a DINO-style backbone-only `.pth`, written by export.py and read by utils.load_backbone,
hubconf.py, the evaluation scripts and timm (timm_models.py).

A safetensors file is a JSON header plus raw tensor bytes: reading it never runs code. The
model configuration travels inside its header (metadata key `sparo_dino`) as well as in
config.json, so the .safetensors file alone is enough to rebuild the model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch

if TYPE_CHECKING:
    from vision_transformer import BackboneConfig

SAFETENSORS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PTH_NAME = "backbone.pth"
METADATA_KEY = "sparo_dino"
PRETRAINED_CFG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "num_classes",
                       "first_conv", "classifier")


def timm_name(config: BackboneConfig) -> str:
    """The timm name that builds this BackboneConfig (timm_models.py), e.g.
    vit_small_patch16_224_sparo; the image size and read-out settings travel as model_args."""
    import timm_models

    return timm_models.registered_name(config) or timm_models.variant_name(
        config.arch, config.patch_size, config.img_size, config.readout)


def export_config(config: BackboneConfig, source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """config.json of a BackboneConfig: timm's hub layout (architecture, num_classes,
    num_features, pretrained_cfg, model_args) plus this project's model_config and the read-out
    spelled out."""
    import timm_models
    import vision_transformer as vits

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
    a set: all three go to temporary files first, then are renamed, the weights before
    config.json, so that a kill never leaves a config.json beside weights it does not describe
    (between two renames the weights are new and config.json old: read_safetensors notices)."""
    from safetensors.torch import save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    meta = export_config(model.config, source)
    state = backbone_state(model)
    paths = {"safetensors": output_dir / SAFETENSORS_NAME, "config": output_dir / CONFIG_NAME,
             "pth": output_dir / PTH_NAME}
    staged = {kind: path.with_name(f".{path.name}.export.tmp") for kind, path in paths.items()}
    try:
        save_file(state, str(staged["safetensors"]), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
        # DINO's released files are bare backbone state dicts; model_config (plain values) rides
        # along so that settings the shapes cannot tell (sparo_norm) survive. DINO's own loader
        # (load_state_dict(strict=False)) ignores that key.
        with open(staged["pth"], "wb") as handle:
            torch.save({**state, "model_config": meta["model_config"]}, handle)
        staged["config"].write_text(json.dumps(meta, indent=2) + "\n")
        shutil.copymode(staged["config"], staged["safetensors"])  # safetensors creates it private (0600)
        for kind in ("safetensors", "pth", "config"):
            staged[kind].replace(paths[kind])
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return paths


def config_json_mismatch(path: Path, model_config: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why the config.json beside an exported weight file does not describe it, or None: an
    export killed between its renames (or files copied from two exports) leaves a pair that
    would otherwise load without a word."""
    sibling = path.with_name(CONFIG_NAME)
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


def read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(tensors, model_config or None) of a .safetensors file; no code is run."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    state = load_file(str(path), device="cpu")
    config = json.loads(metadata[METADATA_KEY]).get("model_config") if METADATA_KEY in metadata else None
    return state, config
