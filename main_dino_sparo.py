"""DINO self-distillation with a SPARO (or CLS) read-out.

    python main_dino_sparo.py --arch vit_small --data_path /path/to/imagenet/train --output_dir OUT
    torchrun --nproc_per_node=8 main_dino_sparo.py --arch vit_small ...
    python main_dino_sparo.py --config configs/cpu_fashion_mnist.yaml

Rerunning the same command resumes from OUT/checkpoint.pth. Method: ../shared/SPARO.md and
Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import augmentations
import run_record
import tensorboard_log
import utils
import vision_transformer as vits
import warm_start
from augmentations import DataAugmentationDINO
from vision_transformer import DINOHead, MultiCropWrapper


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SPARO-DINO", add_help=False)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file whose keys are flag names; flags on the command line win.")

    # --------------------------------------------------------------------------- model
    parser.add_argument("--arch", default="vit_small", type=str, choices=sorted(vits.ARCHS),
                        help="Backbone size, as in DINO: vit_tiny (5M), vit_small (21M), vit_base (85M).")
    parser.add_argument("--patch_size", default=16, type=utils.positive_int,
                        help="Side of the square patches in pixels. Smaller patches mean more "
                             "tokens: better features, quadratically more attention cost.")
    parser.add_argument("--readout", default="sparo", choices=vits.READOUTS,
                        help="sparo: L slots of single-head attention with learned queries "
                             "(this project); cls: DINO's CLS token (the baseline).")
    parser.add_argument("--sparo_slots", default=64, type=utils.positive_int, help="L, the number of SPARO slots.")
    parser.add_argument("--sparo_dim", default=64, type=utils.positive_int,
                        help="V, the output width of each slot; the encoding has L*V dimensions.")
    parser.add_argument("--sparo_attn_dim", default=None, type=utils.positive_int,
                        help="a, the width of each slot's query and keys (default: embed_dim / num_heads).")
    parser.add_argument("--sparo_share_kv", default=True, type=utils.bool_flag,
                        help="Use each slot's keys as its values (SPARO's default).")
    parser.add_argument("--sparo_norm", default="slot", choices=("slot", "global"),
                        help="slot: each slot L2-normalised and scaled by 1/sqrt(L) (SPARO); "
                             "global: one L2 normalisation of the whole vector (ablation).")
    parser.add_argument("--sparo_keep_all_blocks", default=False, type=utils.bool_flag,
                        help="Keep the last transformer block before SPARO. By default SPARO "
                             "replaces it, keeping the parameter count at the CLS baseline's.")
    parser.add_argument("--out_dim", default=65536, type=utils.positive_int,
                        help="Number of prototypes (output width of the DINO head). 65536 for "
                             "ImageNet; a few thousand is plenty for small data sets.")
    parser.add_argument("--head_hidden_dim", default=vits.DINO_HEAD_HIDDEN_DIM, type=utils.positive_int,
                        help="Width of the DINO head's two hidden layers (DINO: 2048). With a "
                             "small backbone the head can cost more than the backbone; a "
                             "narrower head trains faster on small data.")
    parser.add_argument("--head_bottleneck_dim", default=vits.DINO_HEAD_BOTTLENECK_DIM, type=utils.positive_int,
                        help="Width of the L2-normalised bottleneck before the prototypes (DINO: 256).")
    parser.add_argument("--norm_last_layer", default=True, type=utils.bool_flag,
                        help="Weight-normalise the last head layer with a fixed norm. Makes "
                             "training more stable; False can give better ViT-S results.")
    parser.add_argument("--momentum_teacher", default=0.996, type=utils.unit_interval,
                        help="Base EMA momentum of the teacher, raised to 1 on a cosine schedule. "
                             "Use 0.9995 with batch 256; smaller batches want higher values.")
    parser.add_argument("--use_bn_in_head", default=False, type=utils.bool_flag,
                        help="BatchNorm in the projection head (False for ViTs).")

    # --------------------------------------------------------------- temperature (teacher)
    parser.add_argument("--warmup_teacher_temp", default=0.04, type=utils.positive_float,
                        help="Teacher temperature at the start of training. Lower it if the loss "
                             "does not decrease.")
    parser.add_argument("--teacher_temp", default=0.04, type=utils.positive_float,
                        help="Teacher temperature after warm-up. Above 0.07 training tends to be unstable.")
    parser.add_argument("--warmup_teacher_temp_epochs", default=0, type=utils.non_negative_int,
                        help="Epochs of linear teacher-temperature warm-up (30 is DINO's default for long runs).")

    # -------------------------------------------------------------------- optimisation
    parser.add_argument("--use_fp16", default=True, type=utils.bool_flag,
                        help="Mixed precision on CUDA (bf16 on compute capability 8.0+, else fp16 "
                             "with loss scaling). Ignored on CPU, which trains in fp32 unless "
                             "--cpu_bf16 is set.")
    parser.add_argument("--cpu_bf16", default=False, type=utils.bool_flag,
                        help="bf16 autocast on CPU: faster on CPUs with native bf16, less exact.")
    parser.add_argument("--weight_decay", default=0.04, type=utils.non_negative_float, help="Initial weight decay.")
    parser.add_argument("--weight_decay_end", default=0.4, type=utils.non_negative_float,
                        help="Final weight decay (cosine schedule); a rising decay helps ViTs.")
    parser.add_argument("--clip_grad", default=3.0, type=utils.non_negative_float,
                        help="Cap on each parameter's gradient norm; 0 disables clipping.")
    parser.add_argument("--batch_size_per_gpu", default=64, type=utils.positive_int,
                        help="Images per process (per GPU, or per CPU process).")
    parser.add_argument("--epochs", default=100, type=utils.positive_int, help="Number of training epochs.")
    parser.add_argument("--freeze_last_layer", default=1, type=utils.non_negative_int,
                        help="Epochs during which the prototype layer stays fixed; helps early training.")
    parser.add_argument("--lr", default=0.0005, type=utils.positive_float,
                        help="Peak learning rate for a total batch of 256, scaled linearly with "
                             "the total batch size, reached after the warm-up.")
    parser.add_argument("--warmup_epochs", default=10, type=utils.non_negative_int, help="Epochs of linear learning-rate warm-up.")
    parser.add_argument("--min_lr", type=utils.non_negative_float, default=1e-6, help="Learning rate at the end of the cosine.")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "lars"),
                        help="adamw is DINO's recommendation for ViTs.")
    parser.add_argument("--drop_path_rate", type=utils.unit_interval, default=0.1, help="Stochastic depth rate.")
    parser.add_argument("--compile", default=False, type=utils.bool_flag,
                        help="torch.compile the student and teacher (slow start, faster steps on GPU).")

    # ------------------------------------------------------------------------ multi-crop
    parser.add_argument("--global_crops_scale", type=utils.unit_interval, nargs=2, default=(0.4, 1.0),
                        help="Area range of the two global crops relative to the image.")
    parser.add_argument("--global_crops_size", type=utils.positive_int, default=224,
                        help="Side of the global crops in pixels (28 suits Fashion-MNIST).")
    parser.add_argument("--local_crops_number", type=utils.non_negative_int, default=8,
                        help="Number of small local crops; 0 disables multi-crop.")
    parser.add_argument("--local_crops_scale", type=utils.unit_interval, nargs=2, default=(0.05, 0.4),
                        help="Area range of the local crops relative to the image.")
    parser.add_argument("--local_crops_size", type=utils.positive_int, default=96, help="Side of the local crops in pixels.")
    parser.add_argument("--augment_on_device", default=None, type=utils.bool_flag,
                        help="Loader workers only decode, crop and flip (uint8); colour jitter, "
                             "grayscale, blur, solarisation and normalisation run on the training "
                             "device, per image. Default: true on CUDA, false on CPU (measured "
                             "faster there end-to-end). false: DINO's PIL pipeline in the workers.")

    # ---------------------------------------------------------------------------- misc
    parser.add_argument("--data_path", default="fashion_mnist", type=str,
                        help="An ImageFolder directory (labels ignored) or a built-in data set: "
                             "fashion_mnist (apt-get install dataset-fashion-mnist) or digits.")
    parser.add_argument("--subset", default=0, type=utils.non_negative_int,
                        help="Train on N images only (0: all), for quick runs; of a folder, class-balanced.")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="Where checkpoints and log.txt go; a run there is resumed.")
    parser.add_argument("--saveckp_freq", default=20, type=utils.non_negative_int,
                        help="Also keep checkpointNNNN.pth every this many epochs.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    parser.add_argument("--num_workers", default=10, type=utils.non_negative_int, help="Data-loading processes per GPU/process.")
    parser.add_argument("--print_freq", default=10, type=utils.positive_int, help="Print progress every this many iterations.")
    parser.add_argument("--tensorboard", default=True, type=utils.bool_flag,
                        help="Write TensorBoard curves to OUTPUT_DIR/tensorboard/ (rank 0): loss, "
                             "lr, wd, momentum, teacher temperature and entropy per iteration; "
                             "speed, memory and SPARO slot statistics per print interval. "
                             "View with `tensorboard --logdir OUTPUT_DIR`.")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="URL to set up distributed training (torchrun and Slurm set the environment).")
    parser.add_argument("--device", default="auto", choices=utils.DEVICE_CHOICES,
                        help="auto: CUDA when usable; an error when GPUs are visible but CUDA "
                             "cannot use them. cuda: require a GPU. cpu: never use a GPU.")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Ignored; torchrun sets LOCAL_RANK.")
    warm_start.add_args(parser)  # --init_backbone, --init_checkpoint_key, --freeze_backbone_epochs
    return parser


# ==================================================================================== loss
STUDENT_TEMP = 0.1  # DINO's fixed student temperature
class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over all pairs
    (teacher global view i, student view v) with v != i, averaged over pairs and images."""

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = STUDENT_TEMP,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        warmup_epochs = min(warmup_teacher_temp_epochs, nepochs)
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.ones(nepochs - warmup_epochs) * teacher_temp))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch: int) -> torch.Tensor:
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        student_logp = student_logp.view(self.ncrops, -1, student_logp.shape[-1])
        temp = float(self.teacher_temp_schedule[epoch])
        teacher_p = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach()
        # Mean entropy of the teacher's distributions: log(out_dim) means uniform outputs,
        # DINO's collapse signature. Cheap next to the forward pass, read once per print window.
        self.last_teacher_entropy = -(teacher_p * torch.log(teacher_p + 1e-12)).sum(-1).mean().detach()
        teacher_p = teacher_p.view(2, -1, teacher_p.shape[-1])

        # sum over pairs (i, v != i) of q_i . log p_v = (sum_i q_i) . (sum_v log p_v)
        #                                               - sum_i q_i . log p_i
        all_pairs = (teacher_p.sum(0) * student_logp.sum(0)).sum(-1)
        same_view = (teacher_p * student_logp[:2]).sum(-1).sum(0)
        n_pairs = 2 * (self.ncrops - 1)
        loss = -(all_pairs - same_view).mean() / n_pairs
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the whole (all-process) batch."""
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        if utils.is_dist_avail_and_initialized():
            dist.all_reduce(batch_center)
        batch_center /= len(teacher_output) * utils.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


# =============================================================================== helpers
class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; training must stop before anything is saved."""


class StepStatsTracker:
    """Collects per-iteration loss and teacher entropy on the device and checks them in windows.

    Reading a value forces a host-device sync, so it happens once per print interval, not per
    iteration. A non-finite loss in a window is found on every rank together (all-reduce) so
    that all processes stop at the same step.
    """

    def __init__(self) -> None:
        self.window: List[torch.Tensor] = []  # one (loss, teacher entropy) pair per iteration
        self.window_start = 0
        self.totals = torch.zeros(3, dtype=torch.float64)  # loss sum, entropy sum, count

    def add(self, loss: torch.Tensor, teacher_entropy: torch.Tensor) -> None:
        self.window.append(torch.stack([loss.detach().float(), teacher_entropy.float()]))

    def flush(self, epoch: int, next_iteration: int) -> torch.Tensor:
        """Check and clear the window; return its (iterations, 2) losses and teacher entropies
        (float64, on the CPU), one row per iteration since the last flush."""
        values = torch.stack(self.window).cpu().double()
        losses = values[:, 0]
        bad = (~torch.isfinite(losses)).float().max().reshape(1)
        if utils.is_dist_avail_and_initialized():
            bad = bad.to(utils.collective_device())
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            nonfinite = torch.nonzero(~torch.isfinite(losses))
            first = int(nonfinite[0]) if len(nonfinite) else 0
            what = f"loss is {losses[first].item()}" if len(nonfinite) else "another process's loss is not finite"
            raise NonFiniteLoss(f"{what} at epoch {epoch}, iteration {self.window_start + first}; "
                                f"stopping without saving")
        self.totals += torch.tensor([losses.sum().item(), values[:, 1].sum().item(), len(values)],
                                    dtype=torch.float64)
        self.window, self.window_start = [], next_iteration
        return values

    def epoch_means(self) -> Tuple[float, float]:
        """Mean loss and mean teacher entropy over the epoch and all processes."""
        totals = self.totals.clone()
        if utils.is_dist_avail_and_initialized():
            totals = totals.to(utils.collective_device())
            dist.all_reduce(totals)
        count = max(float(totals[2]), 1.0)
        return float(totals[0]) / count, float(totals[1]) / count


def model_config_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    return vits.model_config(arch=args.arch, patch_size=args.patch_size, img_size=args.global_crops_size,
                             readout=args.readout, sparo_slots=args.sparo_slots, sparo_dim=args.sparo_dim,
                             sparo_attn_dim=args.sparo_attn_dim, sparo_share_kv=args.sparo_share_kv,
                             sparo_norm=args.sparo_norm, sparo_keep_all_blocks=args.sparo_keep_all_blocks)


def head_config_from_args(args: argparse.Namespace, in_dim: int) -> Dict[str, Any]:
    return dict(in_dim=in_dim, out_dim=args.out_dim, use_bn=args.use_bn_in_head,
                norm_last_layer=args.norm_last_layer, hidden_dim=args.head_hidden_dim,
                bottleneck_dim=args.head_bottleneck_dim)


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot train, with one clear line each. (The range of
    each single flag is checked where it is parsed, by its argparse type.)"""
    for name in ("global_crops_size", "local_crops_size"):
        size = getattr(args, name)
        if size % args.patch_size:
            raise utils.UserError(f"--{name} {size} is not a multiple of --patch_size {args.patch_size}")
    if args.out_dim < 2:
        raise utils.UserError(f"--out_dim must be at least 2, got {args.out_dim}: with one prototype "
                              f"the loss is exactly 0 and nothing is learned")
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(args, name)
        if not 0 < low <= high:
            raise utils.UserError(f"--{name} takes MIN MAX with 0 < MIN <= MAX <= 1, got {low} {high}")
    if args.warmup_epochs >= args.epochs:
        print(f"Note: --warmup_epochs {args.warmup_epochs} >= --epochs {args.epochs}: the learning "
              f"rate warms up for the whole run and never decays.")
    warn_suspicious_args(args)


def warn_suspicious_args(args: argparse.Namespace) -> None:
    """Legal values that usually train nothing useful: a warning each, training goes on."""
    warnings = []
    if args.momentum_teacher == 1:
        warnings.append("--momentum_teacher 1 never updates the teacher from the student")
    if max(args.teacher_temp, args.warmup_teacher_temp) >= STUDENT_TEMP:
        warnings.append(f"a teacher temperature of {max(args.teacher_temp, args.warmup_teacher_temp)} is "
                        f"not below the student's {STUDENT_TEMP}: the teacher does not sharpen and "
                        f"DINO tends to collapse")
    if args.min_lr > args.lr:
        warnings.append(f"--min_lr {args.min_lr} is above --lr {args.lr}: the cosine schedule rises")
    for warning in warnings:
        print(f"Warning: {warning}.", file=sys.stderr, flush=True)


# Copies of every head weight a training step keeps: student, gradient, teacher, AdamW's two moments.
HEAD_WEIGHT_COPIES = 5


def check_head_fits(args: argparse.Namespace) -> None:
    """With SPARO the DINO head's input is L*V wide; refuse an L*V whose first head layer
    alone cannot fit in the device's memory, instead of dying later in the allocator. Needs
    args.device, so it runs in the job, not in the launcher's early check_args."""
    if args.readout != "sparo":
        return
    width = args.sparo_slots * args.sparo_dim
    needed = width * args.head_hidden_dim * 4 * HEAD_WEIGHT_COPIES
    available = utils.device_memory_bytes(args.device)
    if needed > available:
        raise utils.UserError(
            f"--sparo_slots {args.sparo_slots} x --sparo_dim {args.sparo_dim} = {width} does not fit: "
            f"the DINO head's first layer alone needs {needed / 2**30:.1f} GiB for training "
            f"(weights, gradients, teacher, AdamW state), more than the {available / 2**30:.1f} GiB "
            f"of {args.device.type.upper()} memory here")


def autocast_context(args: argparse.Namespace) -> Tuple[Any, Optional[torch.amp.GradScaler]]:
    """(autocast context factory, grad scaler or None) for this device and precision."""
    if args.device.type == "cuda" and args.use_fp16:
        dtype = utils.amp_dtype(args.device)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return (lambda: torch.autocast("cuda", dtype=dtype)), scaler
    if args.device.type == "cpu" and args.cpu_bf16:
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None
    return contextlib.nullcontext, None


# ================================================================================= training
def build_data_loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    pipeline = augmentations.MultiCropGeometry if args.augment_on_device else DataAugmentationDINO
    transform = pipeline(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                         args.global_crops_size, args.local_crops_size)
    dataset = utils.build_dataset(args.data_path, "pretrain", transform, subset=args.subset, grey=True,
                                  lazy=args.augment_on_device)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=args.world_size,
                                                  rank=args.rank, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
        pin_memory=args.device.type == "cuda", drop_last=True)
    if len(loader) == 0:
        raise utils.UserError(f"--batch_size_per_gpu {args.batch_size_per_gpu} x {args.world_size} "
                              f"process(es) is larger than the data set ({len(dataset)} images)")
    print(f"Data loaded: there are {len(dataset)} images.")
    return loader


def build_student_teacher(args: argparse.Namespace) -> Tuple[nn.Module, nn.Module, Dict[str, Any], Dict[str, Any]]:
    config = model_config_from_args(args)
    student_backbone = vits.build_backbone(config, drop_path_rate=args.drop_path_rate)
    teacher_backbone = vits.build_backbone(config)
    head_config = head_config_from_args(args, student_backbone.num_features)
    student = MultiCropWrapper(student_backbone, DINOHead(**head_config))
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(**head_config))
    if args.cpu_bf16 and args.device.type == "cpu":
        # torch's CPU flash attention is slow in bf16 on short token sequences (its backward
        # took 3x the fp32 time on 17 tokens); the explicit q.k^T softmax runs in AMX matmuls.
        for backbone in (student_backbone, teacher_backbone):
            vits.set_fused_attention(backbone, False)
    return student, teacher, config, head_config


def find_resume_checkpoint(output_dir: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest readable checkpoint in output_dir: checkpoint.pth, else checkpointNNNN.pth.

    None when output_dir holds no checkpoint; an error when it holds only unreadable ones, so
    that a damaged run is never silently restarted from scratch over its files.
    """
    numbered = sorted(output_dir.glob("checkpoint[0-9][0-9][0-9][0-9].pth"), reverse=True)
    candidates = [p for p in [output_dir / "checkpoint.pth"] + numbered if p.exists()]
    for path in candidates:
        try:
            checkpoint = utils.load_checkpoint(path)
        except utils.UserError as error:
            print(f"Skipping unreadable checkpoint: {error}")
            continue
        if {"student", "teacher", "epoch"} <= set(checkpoint):
            return path, checkpoint
        print(f"Skipping {path}: not a training checkpoint (no student/teacher/epoch)")
    if candidates:
        raise utils.UserError(f"{output_dir} holds checkpoints but none is readable "
                              f"({', '.join(p.name for p in candidates)}); move them away to start over")
    return None


def rewrite_log(path: Path, history: List[Dict[str, Any]]) -> None:
    """Make log.txt hold exactly the saved epochs' JSON lines (atomically). A new run creates
    it with its first epoch, so a run that fails before leaves no empty log behind."""
    lines = "".join(json.dumps(record) + "\n" for record in history)
    if (path.exists() and path.read_text() == lines) or (not lines and not path.exists()):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(lines)
    os.replace(tmp, path)


def check_resume_compatible(checkpoint: Dict[str, Any], config: Dict[str, Any],
                            head_config: Dict[str, Any], path: Path) -> None:
    saved = {**checkpoint.get("model_config", {}), **checkpoint.get("head_config", {})}
    wanted = {**config, **head_config}
    differing = [f"{k} ({saved[k]!r} saved, {wanted[k]!r} asked)" for k in wanted
                 if k in saved and saved[k] != wanted[k]]
    if differing:
        raise utils.UserError(f"{path} belongs to a different run: {'; '.join(differing)}. "
                              f"Use another --output_dir or the same arguments.")


# Arguments a resumed run may change on purpose (the model's cannot change: see above).
NOTED_ON_RESUME = ("lr", "min_lr", "data_path", "subset", "batch_size_per_gpu", "epochs",
                   "warmup_epochs", "weight_decay", "weight_decay_end", "momentum_teacher",
                   "teacher_temp", "optimizer", "seed")


def note_changed_args(saved: Any, args: argparse.Namespace) -> None:
    """One line naming the training arguments that differ from the checkpoint's: allowed
    (users change them on purpose), but never silently."""
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else (saved or {})
    now = utils.plain(args)
    changed = [f"--{k} {now[k]} (was {saved[k]})" for k in NOTED_ON_RESUME
               if k in saved and k in now and saved[k] != now[k]]
    if changed:
        print(f"Note: resuming with changed arguments: {', '.join(changed)}.", flush=True)


def prepare_output_dir(output_dir: Path) -> None:
    """Create the output folder (rank 0), check it is writable, lock it against a second run
    and clear stale temporary files; every rank stops if rank 0 cannot."""
    error = None
    if utils.is_main_process():
        try:
            utils.ensure_output_dir(output_dir, "--output_dir")
            utils.lock_output_dir(output_dir)  # before anything in it is read or changed
            utils.remove_stale_temporary_files(output_dir)
        except utils.UserError as raised:
            error = raised
    utils.stop_together(error)


class TrainingSetup(NamedTuple):
    student: nn.Module  # DDP-wrapped when distributed
    teacher: nn.Module
    student_without_ddp: nn.Module
    teacher_without_ddp: nn.Module
    dino_loss: "DINOLoss"
    optimizer: torch.optim.Optimizer
    autocast: Any
    fp16_scaler: Optional[torch.amp.GradScaler]
    config: Dict[str, Any]
    head_config: Dict[str, Any]
    start_epoch: int
    history: List[Dict[str, Any]]


def set_up_training(args: argparse.Namespace, output_dir: Path) -> TrainingSetup:
    """Networks, loss, optimizer and scaler, resumed from output_dir's checkpoint if any.

    The checkpoint is loaded before the DDP wrap and every rank must resume from the same
    epoch. A fresh teacher is copied from the student after the wrap (as in DINO): the wrap
    broadcasts rank 0's student, so every rank starts with the same student and teacher.
    """
    student, teacher, config, head_config = build_student_teacher(args)
    warm_start.apply(args, student.backbone)  # before the teacher copies the student
    student, teacher = student.to(args.device), teacher.to(args.device)
    if args.use_bn_in_head and args.distributed:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    for param in teacher.parameters():
        param.requires_grad = False
    student_without_ddp, teacher_without_ddp = student, teacher
    print(f"Student and teacher are {args.arch} with readout={args.readout} "
          f"(encoding width {student_without_ddp.backbone.num_features}, "
          f"{sum(p.numel() for p in student_without_ddp.backbone.parameters()) / 1e6:.2f}M backbone parameters).")
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs).to(args.device)
    optimizer = utils.build_optimizer(args.optimizer, utils.get_params_groups(student_without_ddp))
    autocast, fp16_scaler = autocast_context(args)

    # ============ optionally resume training ... ============
    start_epoch, history = 0, []
    found = find_resume_checkpoint(output_dir)
    if found is not None:
        path, checkpoint = found
        check_resume_compatible(checkpoint, config, head_config, path)
        student_without_ddp.load_state_dict(checkpoint["student"])
        teacher_without_ddp.load_state_dict(checkpoint["teacher"])
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError as error:  # e.g. a separate-values SPARO run saved with its key bias
            raise utils.UserError(f"{path}: its optimizer state does not fit this model's "
                                  f"parameters ({error}); was it written by an older version of this "
                                  f"code? Resume it with that version, or use another --output_dir") from None
        dino_loss.load_state_dict(checkpoint["dino_loss"])
        if fp16_scaler is not None and checkpoint.get("fp16_scaler"):
            fp16_scaler.load_state_dict(checkpoint["fp16_scaler"])
        start_epoch, history = int(checkpoint["epoch"]), list(checkpoint.get("train_log", []))
        print(f"Resuming from {path} at epoch {start_epoch}.")
        note_changed_args(checkpoint.get("args"), args)
    check_same_start_epoch(start_epoch, output_dir)

    if args.distributed:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[args.gpu] if args.device.type == "cuda" else None)
    if found is None:
        teacher_without_ddp.load_state_dict(student_without_ddp.state_dict())  # after the broadcast
    if args.compile:
        # After the DDP wrap, so that dynamo splits the student's graph at DDP's gradient
        # buckets and the all-reduces still overlap the backward pass. Static shapes: one
        # graph per crop layout instead of slower shape-generic kernels.
        student, teacher = torch.compile(student, dynamic=False), torch.compile(teacher, dynamic=False)
    return TrainingSetup(student, teacher, student_without_ddp, teacher_without_ddp, dino_loss,
                         optimizer, autocast, fp16_scaler, config, head_config, start_epoch, history)


def check_same_start_epoch(start_epoch: int, output_dir: Path) -> None:
    """Every rank must resume from the same epoch; a node-local --output_dir would otherwise
    train diverging models and hang at the end."""
    if not utils.is_dist_avail_and_initialized():
        return
    low = torch.tensor([start_epoch, -start_epoch], device=utils.collective_device())
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    first, last = int(low[0]), -int(low[1])
    if first != last:
        raise utils.UserError(
            f"the processes found different checkpoints in {output_dir} (epochs {first} to {last}; "
            f"this rank: {start_epoch}): --output_dir must be one folder shared by all nodes")


def train_dino(args: argparse.Namespace) -> None:
    utils.init_distributed_mode(args)
    utils.enable_fast_fp32(args.device)
    check_args(args)
    check_head_fits(args)
    if args.augment_on_device is None:  # resolved here, so the checkpoint's args record it
        args.augment_on_device = augmentations.default_on_device(args.device)
    utils.fix_random_seeds(args.seed + args.rank)

    # ============ preparing data ... ============
    data_loader = build_data_loader(args)  # before creating anything: bad data changes no files
    output_dir = Path(args.output_dir)
    prepare_output_dir(output_dir)

    # ============ building networks, loss, optimizer; optionally resuming ... ============
    setup = set_up_training(args, output_dir)
    student, teacher = setup.student, setup.teacher
    student_without_ddp, teacher_without_ddp = setup.student_without_ddp, setup.teacher_without_ddp
    dino_loss, optimizer, fp16_scaler = setup.dino_loss, setup.optimizer, setup.fp16_scaler
    autocast, config, head_config = setup.autocast, setup.config, setup.head_config
    start_epoch, history = setup.start_epoch, setup.history
    iters = len(data_loader)
    total_batch = args.batch_size_per_gpu * args.world_size
    schedules = dict(
        lr=utils.cosine_scheduler(args.lr * total_batch / 256.0, args.min_lr, args.epochs, iters,
                                  warmup_epochs=args.warmup_epochs),
        wd=utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters),
        momentum=utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, iters))
    if utils.is_main_process():
        # log.txt always tells the story of the checkpoint training continues from, even after
        # a crash between writing the checkpoint and appending to the log.
        rewrite_log(output_dir / "log.txt", history)
    if start_epoch >= args.epochs:
        print(f"Nothing to do: {output_dir} already holds {start_epoch} of {args.epochs} epochs.")
        return
    run_record.record_start(args, output_dir, get_args_parser(), start_epoch)

    # Printed once the set-up checks passed, so that an error is the last line of a failed start.
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    train_step = TrainStep(student, teacher, student_without_ddp, teacher_without_ddp, dino_loss,
                           optimizer, autocast, fp16_scaler, args)
    train_step.first_epoch = start_epoch  # its first step explains a CUDA out-of-memory error
    board = tensorboard_log.TrainingBoard(output_dir, first_step=start_epoch * iters,
                                          enabled=args.tensorboard and utils.is_main_process())
    start_time = time.time()
    print(f"Starting DINO training! (augmentation: "
          f"{'photometric on ' + args.device.type if args.augment_on_device else 'PIL in the loader'})")
    for epoch in range(start_epoch, args.epochs):
        # Seeding every epoch makes a resumed run draw the same crops as an uninterrupted one.
        utils.fix_random_seeds(args.seed + 7919 * epoch + args.rank)
        data_loader.sampler.set_epoch(epoch)

        # ============ training one epoch of DINO ... ============
        epoch_start = time.time()
        train_stats = train_one_epoch(train_step, data_loader, schedules, epoch, args, board)
        board.flush()  # before the checkpoint: the curves on disk always reach it

        # ============ writing logs and checkpoints ... ============
        # epoch_seconds lets a run's training time be summed across resumes (the log is kept).
        history.append({**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                        "epoch_seconds": round(time.time() - epoch_start, 2)})
        save_dict = dict(student=student_without_ddp.state_dict(), teacher=teacher_without_ddp.state_dict(),
                         optimizer=optimizer.state_dict(), epoch=epoch + 1, args=utils.plain(args),
                         dino_loss=dino_loss.state_dict(),
                         fp16_scaler=fp16_scaler.state_dict() if fp16_scaler is not None else None,
                         model_config=config, head_config=head_config, train_log=history)
        utils.save_on_master(save_dict, output_dir / "checkpoint.pth")
        if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
            utils.save_on_master(save_dict, output_dir / f"checkpoint{epoch:04}.pth")
        if utils.is_main_process():
            utils.write_json_line(output_dir / "log.txt", history[-1])
    board.close()
    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total_time}")


class TrainStep:
    """One DINO iteration: teacher and student forward, loss, backward, step, EMA."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_without_ddp: nn.Module,
                 teacher_without_ddp: nn.Module, dino_loss: DINOLoss, optimizer: torch.optim.Optimizer,
                 autocast: Any, fp16_scaler: Optional[torch.amp.GradScaler], args: argparse.Namespace) -> None:
        self.student, self.teacher, self.dino_loss, self.optimizer = student, teacher, dino_loss, optimizer
        self.student_without_ddp = student_without_ddp
        self.autocast, self.fp16_scaler, self.args = autocast, fp16_scaler, args
        self.first_epoch = 0  # the epoch this process starts at (train_dino sets it on resume)
        # The EMA pairs each teacher parameter with the student parameter of the same name.
        self.teacher_backbone = teacher_without_ddp.backbone
        teacher_params = dict(teacher_without_ddp.named_parameters())
        self.ema_pairs = [(teacher_params[name], param)
                          for name, param in student_without_ddp.named_parameters()]
        self.teacher_ema = [t for t, _ in self.ema_pairs]
        self.student_ema = [s for _, s in self.ema_pairs]
        self.augment = augmentations.PhotometricAugmentation(args.local_crops_number, args.global_crops_size) \
            if args.augment_on_device else None

    def __call__(self, images: List[torch.Tensor], epoch: int, lr: float, wd: float,
                 momentum: float) -> torch.Tensor:
        """Train on one batch of crops; returns the loss (a 0-d tensor, not synchronised)."""
        if self.augment is not None:  # uint8 crops from MultiCropGeometry
            images = self.augment(images)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:  # only the first group is regularised
                group["weight_decay"] = wd
        self.global_crops = images[:2]  # what the teacher saw (slot statistics read them)
        with self.autocast():
            with torch.no_grad():
                teacher_output = self.teacher(images[:2])  # only the 2 global views
            student_output = self.student(images)
            loss = self.dino_loss(student_output, teacher_output, epoch)

        self.optimizer.zero_grad(set_to_none=True)
        if self.fp16_scaler is None:
            loss.backward()
        else:
            self.fp16_scaler.scale(loss).backward()
            self.fp16_scaler.unscale_(self.optimizer)
        if self.args.clip_grad:
            utils.clip_gradients(self.student_without_ddp, self.args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, self.student_without_ddp, self.args.freeze_last_layer)
        warm_start.cancel_gradients_frozen_backbone(epoch, self.student_without_ddp,
                                                    self.args.freeze_backbone_epochs)
        if self.fp16_scaler is None:
            self.optimizer.step()
        else:
            self.fp16_scaler.step(self.optimizer)
            self.fp16_scaler.update()

        with torch.no_grad():  # teacher = m * teacher + (1 - m) * student
            torch._foreach_mul_(self.teacher_ema, momentum)
            torch._foreach_add_(self.teacher_ema, self.student_ema, alpha=1.0 - momentum)
        return loss


def train_one_epoch(train_step: TrainStep, data_loader: torch.utils.data.DataLoader,
                    schedules: Dict[str, np.ndarray], epoch: int, args: argparse.Namespace,
                    board: tensorboard_log.TrainingBoard) -> Dict[str, float]:
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.meters["loss"] = utils.SmoothedValue(window_size=20, fmt="{value:.4f} ({global_avg:.4f})")
    metric_logger.meters["lr"] = utils.SmoothedValue(window_size=1, fmt="{value:.3e}")
    metric_logger.meters["wd"] = utils.SmoothedValue(window_size=1, fmt="{value:.4f}")
    header = f"Epoch: [{epoch}/{args.epochs}]"
    tracker = StepStatsTracker()
    iters = len(data_loader)
    images_per_iter = args.batch_size_per_gpu * args.world_size
    non_blocking = args.device.type == "cuda"
    def log_speed(iteration: int, speed: Dict[str, float]) -> None:
        board.add_scalars(speed, iters * epoch + iteration)

    for it, (images, _) in enumerate(metric_logger.log_every(data_loader, args.print_freq, header,
                                                             samples_per_iter=images_per_iter,
                                                             on_print=log_speed)):
        step = iters * epoch + it  # global training iteration
        images = [im.to(args.device, non_blocking=non_blocking) for im in images]
        with explain_out_of_memory(args, first_step=it == 0 and epoch == train_step.first_epoch):
            loss = train_step(images, epoch, float(schedules["lr"][step]), float(schedules["wd"][step]),
                              float(schedules["momentum"][step]))
        tracker.add(loss, train_step.dino_loss.last_teacher_entropy)
        if it % args.print_freq == 0 or it == iters - 1:
            window_start = tracker.window_start
            window = tracker.flush(epoch, it + 1)
            metric_logger.meters["loss"].update(float(window[:, 0].mean()))
            write_window(board, train_step, window, schedules, iters * epoch + window_start, epoch)
            metric_logger.update(lr=schedules["lr"][step], wd=schedules["wd"][step])
    epoch_steps = slice(iters * epoch, iters * (epoch + 1))
    loss, teacher_entropy = tracker.epoch_means()
    stats = dict(loss=loss, lr=float(schedules["lr"][epoch_steps].mean()),
                 wd=float(schedules["wd"][epoch_steps].mean()), teacher_entropy=teacher_entropy)
    print(f"Averaged stats: loss: {loss:.6f}  lr: {stats['lr']:.6f}  wd: {stats['wd']:.6f}  "
          f"teacher entropy: {teacher_entropy:.3f} (uniform: {math.log(args.out_dim):.3f})")
    warn_if_collapsed(teacher_entropy, args.out_dim, epoch)
    return stats


def write_window(board: tensorboard_log.TrainingBoard, train_step: TrainStep, window: torch.Tensor,
                 schedules: Dict[str, np.ndarray], first_step: int, epoch: int) -> None:
    """TensorBoard: every iteration of a print window, and the teacher's slot statistics on the
    window's last global crops (one extra teacher forward per window, SPARO only)."""
    if not board.enabled:
        return
    steps = slice(first_step, first_step + len(window))
    teacher_temp = float(train_step.dino_loss.teacher_temp_schedule[epoch])
    board.add_series({"train/loss": window[:, 0].tolist(), "train/teacher_entropy": window[:, 1].tolist(),
                      "train/lr": schedules["lr"][steps], "train/wd": schedules["wd"][steps],
                      "train/momentum": schedules["momentum"][steps],
                      "train/teacher_temp": [teacher_temp] * len(window)}, first_step)
    backbone = train_step.teacher_backbone
    if backbone.sparo is not None:
        with torch.no_grad(), train_step.autocast():
            attention = backbone.get_slot_attention(train_step.global_crops[0])
        board.add_slot_statistics(tensorboard_log.slot_statistics(attention), steps.stop - 1)


@contextlib.contextmanager
def explain_out_of_memory(args: argparse.Namespace, first_step: bool) -> Any:
    """A CUDA out-of-memory error in a process's first training step becomes one line with
    the memory used and a batch size that would fit; later ones stay tracebacks (they mean
    something else: fragmentation, a leak)."""
    if not first_step or args.device.type != "cuda":
        yield
        return
    base = torch.cuda.memory_allocated(args.device)  # weights, optimizer state, inputs
    torch.cuda.reset_peak_memory_stats(args.device)
    try:
        yield
    except torch.OutOfMemoryError as error:
        peak = torch.cuda.max_memory_allocated(args.device)
        total = torch.cuda.get_device_properties(args.device).total_memory
        raise utils.UserError(out_of_memory_message(str(error), base, peak, total,
                                                    args.batch_size_per_gpu)) from None


def out_of_memory_message(error: str, base: int, peak: int, total: int, batch: int) -> str:
    """The one-line advice for a first-step OOM. Activation memory grows with the batch: the
    part above `base` at the failure, plus the allocation that failed, is at least what
    `batch` images need, so the batch that fits in 90 % of the GPU is at most the estimate."""
    match = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)", error)
    scale = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}
    failed = float(match.group(1)) * scale[match.group(2)] if match else 0.0
    per_image = max(peak + failed - base, 1.0) / batch
    fits = int((0.9 * total - base) // per_image)
    advice = (f"try --batch_size_per_gpu {fits} or less (estimate)" if fits >= 1 else
              "the model and optimizer alone nearly fill it: use a smaller --arch or --out_dim")
    return (f"CUDA out of memory in the first training step at --batch_size_per_gpu {batch}: "
            f"{base / 2**30:.1f} GiB held before the step, {peak / 2**30:.1f} GiB peak, "
            f"{failed / 2**30:.2f} GiB more asked, {total / 2**30:.1f} GiB on the GPU; {advice}")


def warn_if_collapsed(teacher_entropy: float, out_dim: int, epoch: int) -> None:
    """DINO's known failure: the teacher's outputs become uniform (entropy -> log(out_dim))."""
    if epoch >= 1 and teacher_entropy > 0.98 * math.log(out_dim):
        print(f"Warning: the teacher's outputs are almost uniform (entropy {teacher_entropy:.3f} of "
              f"at most {math.log(out_dim):.3f}): DINO is collapsing. Try a lower --teacher_temp, a "
              f"higher --momentum_teacher, --norm_last_layer true or a lower --lr.", flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser("SPARO-DINO", parents=[get_args_parser()])
    args = utils.parse_args_with_config(parser, argv)
    try:
        train_dino(args)
    except NonFiniteLoss as error:
        saved = Path(args.output_dir) / "checkpoint.pth"
        kept = (f"the last good checkpoint {saved} is untouched" if saved.exists()
                else "no checkpoint was written yet (the first epoch did not finish)")
        print(f"error: {error}; {kept}", file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        utils.release_output_locks()
        utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_main(main)
