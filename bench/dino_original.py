"""The original facebookresearch/dino modules, imported from a local clone (Apache-2.0).

DINO's files are top-level modules named `utils`, `vision_transformer` and `main_dino`, and two
of those names are also this project's. `load_dino(repo)` imports DINO's three files under
private names, lets them see each other as `utils` / `vision_transformer` while they import,
and restores whatever `sys.modules` held before, so both code bases live in one process. Used
by bench/train_throughput.py --dino_repo and by the tests that compare with DINO; nothing of
DINO's code is copied here.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Dict, Optional

import utils

DINO_FILES = ("utils", "vision_transformer", "main_dino")
# Where the tests look for a clone (DINO_REPO overrides); they skip when there is none.
DEFAULT_DINO_REPO = Path(os.environ.get("DINO_REPO", "/work/dino_ref"))

_loaded: Dict[Path, types.SimpleNamespace] = {}


def load_dino(repo: str | Path) -> types.SimpleNamespace:
    """DINO's modules from a clone, as .utils, .vision_transformer and .main_dino."""
    root = Path(repo).resolve()
    if root in _loaded:
        return _loaded[root]
    missing = [f"{name}.py" for name in DINO_FILES if not (root / f"{name}.py").is_file()]
    if missing:
        raise utils.UserError(f"{repo} is not a clone of facebookresearch/dino (no {', '.join(missing)})")
    saved = {name: sys.modules.get(name) for name in DINO_FILES}
    modules = {}
    try:
        for name in DINO_FILES:  # in dependency order: each sees the previous ones by their names
            spec = importlib.util.spec_from_file_location(f"dino_original_{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            modules[name] = module
    finally:
        for name, module in saved.items():
            _restore(name, module)
    _loaded[root] = types.SimpleNamespace(**modules)
    return _loaded[root]


def dino_available(repo: Optional[str | Path] = None) -> bool:
    """Whether a DINO clone is at repo (default: DEFAULT_DINO_REPO)."""
    root = Path(repo or DEFAULT_DINO_REPO)
    return all((root / f"{name}.py").is_file() for name in DINO_FILES)


def _restore(name: str, module: Optional[types.ModuleType]) -> None:
    if module is None:
        sys.modules.pop(name, None)
    else:
        sys.modules[name] = module
