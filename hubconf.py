"""torch.hub entry points (README, "torch.hub"): ViT backbones with every read-out, from local
files only; nothing is ever downloaded.

    model = torch.hub.load("/path/to/sparo-dino", "sparo_vit_small",
                           pretrained_weights="out/checkpoint.pth", source="local")
"""
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

dependencies = ["torch", "timm", "numpy"]

_REPO = Path(__file__).resolve().parent
# DINO's released files for its hub names, for the message telling a user what to pass.
_DINO_FILES = {"dino_vits16": "dino_deitsmall16_pretrain", "dino_vits8": "dino_deitsmall8_pretrain",
               "dino_vitb16": "dino_vitbase16_pretrain", "dino_vitb8": "dino_vitbase8_pretrain"}


@contextlib.contextmanager
def _own_module_names() -> Iterator[None]:
    """Names like `utils` are common (DINO has one too): a module named like one of this
    repository's that was imported from elsewhere is set aside while ours are imported, and put
    back afterwards (this file keeps its references to ours)."""
    names = {path.stem for path in _REPO.glob("*.py")}
    set_aside = {name: sys.modules.pop(name) for name in names if name in sys.modules and
                 Path(getattr(sys.modules[name], "__file__", None) or "").resolve().parent != _REPO}
    sys.path.insert(0, str(_REPO))
    try:
        yield
    finally:
        sys.path.remove(str(_REPO))
        sys.modules.update(set_aside)


with _own_module_names():
    import vision_transformer as vits
    import weight_files


def _entry_point(arch: str, readout: str, patch_size: Optional[int] = None) -> Callable[..., Any]:
    """An entry point building `arch` with `readout`; `patch_size` fixes the patch size."""

    def build(pretrained_weights: Optional[str] = None, checkpoint_key: str = "teacher",
              pretrained: Optional[bool] = None, **kwargs: Any) -> Any:
        _check_pretrained(build.__name__, pretrained, pretrained_weights)
        if patch_size is not None:
            if kwargs.setdefault("patch_size", patch_size) != patch_size:
                raise ValueError(f"this entry point has patch size {patch_size}, not "
                                 f"{kwargs['patch_size']}; use the {arch} entry point instead")
        for name in ("arch", "readout"):
            if name in kwargs:
                raise TypeError(f"{name} is set by the entry point; pick another entry point")
        asked = vits.BackboneConfig.take_fields(kwargs)  # the rest are model options
        if pretrained_weights is None:
            return vits.BackboneConfig(arch=arch, readout=readout, **asked).build(**kwargs)
        model, _ = weight_files.load_backbone(str(pretrained_weights), checkpoint_key,
                                              expected={"arch": arch, "readout": readout, **asked})
        if kwargs:  # e.g. drop_path_rate for fine-tuning: rebuild around the same weights
            rebuilt = model.config.build(**kwargs)
            rebuilt.load_state_dict(model.state_dict(), strict=True)
            model = rebuilt
        return model

    prefix = "dino" if readout == "cls" else readout
    build.__name__ = f"{prefix}_{arch}" if patch_size is None else f"dino_vit{arch[4]}{patch_size}"
    kind = vits.READOUT_KINDS[readout].label
    fixed = f", patch size {patch_size}" if patch_size else ""
    build.__doc__ = (f"{arch} with the {kind}{fixed}. pretrained_weights: a local checkpoint "
                     f"(this project's, a bare state dict or an official DINO file; key "
                     f"`checkpoint_key`), or None for random initialisation. Other keyword "
                     f"arguments go to the model (patch_size, img_size, sparo_slots, ...).")
    return build


def _check_pretrained(name: str, pretrained: Optional[bool], pretrained_weights: Optional[str]) -> None:
    """DINO's hub entries download weights (pretrained=True by default); these never do. Say
    so instead of silently handing a DINO user a random network."""
    stem = _DINO_FILES.get(name)
    where = (f"download https://dl.fbaipublicfiles.com/dino/{stem}/{stem}.pth yourself and pass "
             f"pretrained_weights='{stem}.pth'" if stem else
             "pass pretrained_weights=PATH (a checkpoint, export.py's model.safetensors or a DINO file)")
    if pretrained and pretrained_weights is None:
        raise ValueError(f"{name}: nothing is downloaded here (pretrained=True); {where}")
    if stem and pretrained is None and pretrained_weights is None:
        warnings.warn(f"{name} without pretrained_weights is a randomly initialised network (nothing "
                      f"is downloaded here): {where}, or pass pretrained=False for random weights",
                      stacklevel=3)


# {sparo,dino,gap,cls_proj}_vit_{tiny,small,base}: every read-out (cls under DINO's name) and
# size; gap and cls_proj are the controls of issue 19 (README, "Read-outs").
for _readout in vits.READOUTS:
    for _arch in ("vit_tiny", "vit_small", "vit_base"):
        _build = _entry_point(_arch, _readout)
        globals()[_build.__name__] = _build
# DINO's own hub names (facebookresearch/dino), here from a local file only.
dino_vits16 = _entry_point("vit_small", "cls", patch_size=16)
dino_vits8 = _entry_point("vit_small", "cls", patch_size=8)
dino_vitb16 = _entry_point("vit_base", "cls", patch_size=16)
dino_vitb8 = _entry_point("vit_base", "cls", patch_size=8)
