"""This project's backbones in timm's model registry (README, "timm").

    import timm, timm_models  # the import registers vit_{nano,tiny,small,base}_patch*_*_{read-out}
    model = timm.create_model("vit_small_patch16_224_sparo", pretrained=True,
                              pretrained_cfg_overlay=dict(file="export/model.safetensors"))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

import timm
from timm.models import build_model_with_cfg, register_model

import errors
import utils
import vision_transformer as vits
import weight_files

# (arch, patch size, default image size) of every registered name, with both read-outs.
VARIANTS = [(arch, patch, 224) for arch in ("vit_nano", "vit_tiny", "vit_small", "vit_base")
            for patch in (8, 16)] + [("vit_nano", 7, 28), ("vit_tiny", 4, 28)]


def variant_name(arch: str, patch_size: int, img_size: int, readout: str) -> str:
    return f"{arch}_patch{patch_size}_{img_size}_{readout}"


def registered_name(config: vits.BackboneConfig) -> Optional[str]:
    """The registered name that builds this configuration (its image size preferred)."""
    candidates = [(img != config.img_size, variant_name(arch, patch, img, config.readout))
                  for arch, patch, img in VARIANTS if arch == config.arch and patch == config.patch_size]
    return min(candidates)[1] if candidates else None


class TimmVisionTransformer(vits.VisionTransformer):
    """The project's ViT with timm's conventions: forward_features -> tokens, forward_head ->
    encoding (pre_logits) or logits of an optional Linear classifier (num_classes > 0)."""

    def __init__(self, num_classes: int = 0, global_pool: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.global_pool = self.readout  # the read-out plays timm's pooling role
        self.num_classes = num_classes
        self.head_hidden_size = self.num_features
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            vits._init_dino_weights(self.head)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        encoding = self.read_out(x)
        return encoding if pre_logits else self.head(encoding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _resampled(state: Dict[str, torch.Tensor], model: TimmVisionTransformer) -> Dict[str, torch.Tensor]:
    """state with its position embeddings resampled to the model's grid."""
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = vits.resample_pos_embed(state["pos_embed"], model.pos_grid)
    return state


def _filter_state(state: Dict[str, Any], model: TimmVisionTransformer) -> Dict[str, torch.Tensor]:
    """The backbone tensors of a file timm read itself (a `local-dir:` folder)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return _resampled(weight_files.backbone_tensors(tensors)[0], model)


def _create(arch: str, patch_size: int, img_size: int, readout: str, pretrained: bool = False,
            /, **kwargs: Any) -> TimmVisionTransformer:
    name = variant_name(arch, patch_size, img_size, readout)
    if kwargs.get("patch_size", patch_size) != patch_size:
        raise ValueError(f"{name} has patch size {patch_size}, not {kwargs['patch_size']}")
    if "arch" in kwargs or "readout" in kwargs:
        raise TypeError(f"{name} fixes the arch and read-out; pick another name")
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    asked = vits.BackboneConfig.take_fields(kwargs)  # the rest are model options
    if isinstance(asked.get("img_size"), (tuple, list)):  # timm passes input_size[-2:]
        asked["img_size"] = int(asked["img_size"][0])
    config = vits.BackboneConfig(arch=arch, patch_size=patch_size, img_size=img_size, readout=readout)
    weights = None
    if pretrained and overlay.get("file"):  # read here, once; timm gets the model to load into
        weights = weight_files.read_backbone(str(overlay["file"]))
        for key in ("arch", "readout", "patch_size"):
            if getattr(weights.config, key) != getattr(config, key):
                raise ValueError(f"{overlay['file']} holds a model with {key}={getattr(weights.config, key)!r}, "
                                 f"but {name} has {key}={getattr(config, key)!r}")
        # arguments given here must agree with the file (the input size may differ)
        disagreement = weights.config.disagreement({k: v for k, v in asked.items() if k != "img_size"})
        if disagreement:
            raise ValueError(f"{overlay['file']} {disagreement}")
        config = weights.config
        try:  # before timm allocates anything of the file's sizes
            weight_files.check_state_fits(weights.state, config, overlay["file"])
        except errors.UserError as error:
            raise ValueError(str(error)) from None
        overlay.setdefault("input_size", (3, config.img_size, config.img_size))
    model = build_model_with_cfg(TimmVisionTransformer, name, pretrained and weights is None,
                                 pretrained_cfg_overlay=overlay, pretrained_filter_fn=_filter_state,
                                 config=dataclasses.replace(config, **asked), **kwargs)
    if weights is not None:  # as timm loads: strictly, unless a classifier head was asked for
        model.load_state_dict(_resampled(weights.state, model), strict=model.num_classes == 0)
    return model


def pretrained_cfg_for(img_size: int) -> Dict[str, Any]:
    """timm's pretrained_cfg of a backbone trained at img_size: DINO's evaluation
    pre-processing (bicubic resize to img_size * 256/224, centre crop, ImageNet mean/std)."""
    return dict(url="", num_classes=0, input_size=(3, img_size, img_size), pool_size=None,
                crop_pct=round(img_size / round(img_size * 256 / 224), 4), interpolation="bicubic",
                mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD, first_conv="patch_embed.proj",
                classifier="head", fixed_input_size=False, license="apache-2.0")


def _entry_point(arch: str, patch_size: int, img_size: int, readout: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool = False, **kwargs: Any) -> TimmVisionTransformer:
        return _create(arch, patch_size, img_size, readout, pretrained, **kwargs)

    build.__name__ = build.__qualname__ = variant_name(arch, patch_size, img_size, readout)
    build.__module__ = __name__
    build.__doc__ = f"{arch}/{patch_size} with the {readout} read-out ({img_size} px by default)."
    return build


default_cfgs: Dict[str, Dict[str, Any]] = {}


def register_all() -> None:
    """Register every variant once (a second import of this module changes nothing)."""
    for arch, patch, img in VARIANTS:
        for readout in vits.READOUTS:
            name = variant_name(arch, patch, img, readout)
            if timm.models.is_model(name):
                continue
            default_cfgs[name] = pretrained_cfg_for(img)
            register_model(_entry_point(arch, patch, img, readout))


register_all()
