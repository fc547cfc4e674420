"""The original DINO ViT (facebookresearch/dino, checked out read-only at /work/dino_ref),
imported side by side with this project's modules to make official-layout weight files."""
import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

DINO_REF = Path(os.environ.get("DINO_REF", "/work/dino_ref"))

needs_dino_ref = pytest.mark.skipif(not (DINO_REF / "vision_transformer.py").is_file(),
                                    reason=f"the original DINO code is not at {DINO_REF} (set DINO_REF)")


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, DINO_REF / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def dino_modules():
    """(DINO's utils, DINO's vision_transformer) under private names. DINO's ViT does
    `from utils import trunc_normal_`: its utils stands in for ours while it is imported."""
    ours = sys.modules.get("utils")
    dino_utils = _load("dino_ref_utils", "utils.py")
    sys.modules["utils"] = dino_utils
    try:
        dino_vits = _load("dino_ref_vision_transformer", "vision_transformer.py")
    finally:
        if ours is not None:
            sys.modules["utils"] = ours
        else:
            sys.modules.pop("utils")
    return dino_utils, dino_vits


def dino_vit_tiny(patch_size: int = 4, img_size: int = 16, seed: int = 0) -> torch.nn.Module:
    """DINO's own vit_tiny (12 blocks, width 192), randomly initialised, in eval mode."""
    _, dino_vits = dino_modules()
    torch.manual_seed(seed)
    return dino_vits.vit_tiny(patch_size=patch_size, img_size=[img_size]).eval()
