"""A plain DINO training step with the computational structure of the original DINO code.

The original facebookresearch/dino code cannot be fetched here, so this module re-expresses
its step, from its published description, on this project's modules: the CLS read-out, the
attention computed as explicit softmax(q k^T) v (DINO's Attention, no fused kernel), the loss
as a Python loop over (teacher view, student view) pairs, gradient clipping and the EMA as
Python loops over parameters with a host sync per clipped parameter, AdamW with PyTorch's
default implementation, fp16 autocast with a GradScaler on CUDA, and the loss read back with
.item() every iteration (DINO checks it for NaN and logs it). It serves as the "plain
reference" of bench/train_throughput.py; it is not used for training.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main_dino_sparo as dino  # noqa: E402
import vision_transformer as vits  # noqa: E402
import utils  # noqa: E402


def pairwise_dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor,
                       center: torch.Tensor, ncrops: int, student_temp: float,
                       teacher_temp: float) -> torch.Tensor:
    """DINO's loss as the original writes it: one cross-entropy per (teacher, student) pair."""
    student_chunks = (student_output / student_temp).chunk(ncrops)
    teacher_chunks = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, pairs = 0.0, 0
    for i, q in enumerate(teacher_chunks):
        for v, s in enumerate(student_chunks):
            if v == i:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


class ReferenceStep:
    """Teacher and student forward, loss, backward, clipping, step and EMA, DINO-style."""

    def __init__(self, args: argparse.Namespace) -> None:
        models, optimisation = dino.build_training(argparse.Namespace(**{**vars(args), "readout": "cls"}))
        self.student, self.teacher, self.loss = models.student, models.teacher, optimisation.dino_loss
        for model in (self.student, self.teacher):
            vits.set_fused_attention(model, False)  # explicit softmax(q k^T) v, as in DINO
        self.optimizer = torch.optim.AdamW(utils.get_params_groups(self.student))  # default implementation
        self.cuda_fp16 = args.device.type == "cuda" and args.use_fp16  # DINO's fp16 recipe
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda_fp16)
        self.clip, self.freeze_last_layer = args.clip_grad, args.freeze_last_layer

    def __call__(self, images: List[torch.Tensor], epoch: int, lr: float, wd: float,
                 momentum: float) -> torch.Tensor:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda_fp16):
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = pairwise_dino_loss(student_output, teacher_output, self.loss.center, self.loss.ncrops,
                                      self.loss.student_temp, float(self.loss.teacher_temp_schedule[epoch]))
            self.loss.update_center(teacher_output)
        if not math.isfinite(loss.item()):
            raise RuntimeError("loss is not finite")
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        self.clip_per_parameter()
        if epoch < self.freeze_last_layer:
            for name, param in self.student.named_parameters():
                if "last_layer" in name:
                    param.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
        loss.item()  # DINO's metric logger reads the loss every iteration
        return loss

    def clip_per_parameter(self) -> None:
        for param in self.student.parameters():
            if param.grad is not None:
                clip_coef = self.clip / (param.grad.data.norm(2) + 1e-6)
                if clip_coef < 1:  # a host sync per parameter, as in the original
                    param.grad.data.mul_(clip_coef)
