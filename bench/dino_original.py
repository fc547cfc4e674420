"""The original facebookresearch/dino modules, imported from a local clone (Apache-2.0).

DINO's files are top-level modules named `utils`, `vision_transformer` and `main_dino`, and two
of those names are also this project's. `load_dino(repo)` imports DINO's three files under
private names, lets them see each other as `utils` / `vision_transformer` while they import,
and restores whatever `sys.modules` held before, so both code bases live in one process. Used
by bench/train_throughput.py --dino_repo (with OriginalDinoStep, DINO's training iteration
assembled from its own functions) and by the tests that compare with DINO; nothing of DINO's
code is copied here.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import devices
import errors

DINO_FILES = ("utils", "vision_transformer", "main_dino")
# The one place the comparisons with DINO's own code find it: the DINO_REPO environment
# variable (no default path: without it they skip, and gpu_check asks for it).
DINO_REPO: Optional[Path] = Path(os.environ["DINO_REPO"]) if os.environ.get("DINO_REPO") else None

_loaded: Dict[Path, types.SimpleNamespace] = {}


def load_dino(repo: str | Path) -> types.SimpleNamespace:
    """DINO's modules from a clone, as .utils, .vision_transformer and .main_dino."""
    root = Path(repo).resolve()
    if root in _loaded:
        return _loaded[root]
    missing = [f"{name}.py" for name in DINO_FILES if not (root / f"{name}.py").is_file()]
    if missing:
        raise errors.UserError(f"{repo} is not a clone of facebookresearch/dino (no {', '.join(missing)})")
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
    """Whether a DINO clone is at repo (default: $DINO_REPO; False when neither is given)."""
    root = repo or DINO_REPO
    return root is not None and all((Path(root) / f"{name}.py").is_file() for name in DINO_FILES)


def _restore(name: str, module: Optional[types.ModuleType]) -> None:
    if module is None:
        sys.modules.pop(name, None)
    else:
        sys.modules[name] = module


class OriginalDinoStep:
    """One iteration of DINO's train_one_epoch, made of the original modules: DINO's ViT,
    DINOHead, MultiCropWrapper and DINOLoss, its get_params_groups, clip_gradients and
    cancel_gradients_last_layer, PyTorch's default AdamW as DINO builds it, the EMA as DINO's
    per-parameter loop, and the per-iteration loss.item() (DINO's NaN check) and CUDA sync.

    Precision is the caller's (the `autocast` context of this project's step) so that both
    codes are timed in the same arithmetic; a GradScaler is used only for fp16, as DINO does.
    DINOLoss all-reduces its centre, so a process group must exist (a group of one will do).
    """

    def __init__(self, dino: types.SimpleNamespace, args: Any, autocast: Callable[[], Any]) -> None:
        import torch

        vits, dino_utils = dino.vision_transformer, dino.utils
        if not callable(getattr(vits, args.arch, None)):
            raise errors.UserError(f"DINO's code has no {args.arch}")
        # DINO trains at 224 px only; its position table is sized for the global crops here,
        # as this project's is, so that both models have the same parameters.
        size = dict(patch_size=args.patch_size, img_size=[args.global_crops_size])
        student = getattr(vits, args.arch)(drop_path_rate=args.drop_path_rate, **size)
        teacher = getattr(vits, args.arch)(**size)
        width = student.embed_dim
        self.student = dino_utils.MultiCropWrapper(student, vits.DINOHead(
            width, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer)).to(args.device)
        self.teacher = dino_utils.MultiCropWrapper(
            teacher, vits.DINOHead(width, args.out_dim, args.use_bn_in_head)).to(args.device)
        self.teacher.load_state_dict(self.student.state_dict())
        for param in self.teacher.parameters():
            param.requires_grad = False
        self.loss = dino.main_dino.DINOLoss(
            args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
            args.warmup_teacher_temp_epochs, args.epochs).to(args.device)
        self.optimizer = torch.optim.AdamW(dino_utils.get_params_groups(self.student))
        fp16 = devices.autocast_dtype(args.device, args.use_fp16) == torch.float16  # the project's rule
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.utils, self.autocast, self.args = dino_utils, autocast, args

    def __call__(self, images: List[Any], epoch: int, lr: float, wd: float, momentum: float) -> Any:
        import torch

        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        with self.autocast():
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = self.loss(student_output, teacher_output, epoch)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()}")
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        if self.args.clip_grad:
            self.utils.clip_gradients(self.student, self.args.clip_grad)
        self.utils.cancel_gradients_last_layer(epoch, self.student, self.args.freeze_last_layer)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with torch.no_grad():
            for student_param, teacher_param in zip(self.student.parameters(), self.teacher.parameters()):
                teacher_param.data.mul_(momentum).add_((1 - momentum) * student_param.detach().data)
        if torch.cuda.is_available() and self.args.device.type == "cuda":
            torch.cuda.synchronize()
        loss.item()  # DINO's metric logger
        return loss
