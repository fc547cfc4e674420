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
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import augmentations
import config_files
import datasets
import devices
import errors
import knn_monitor
import run_folder
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
    utils.add_backbone_args(parser)  # --arch, --patch_size, --readout, --sparo_*
    parser.add_argument("--out_dim", default=65536, type=prototype_count,
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
                        help="Base EMA momentum of the teacher, raised to --momentum_teacher_end on a "
                             "cosine schedule. Use 0.9995 with batch 256; smaller batches want higher "
                             "values. Runs of a few thousand iterations want lower ones (0.99): the "
                             "teacher averages the last ~1/(1-m) student steps.")
    parser.add_argument("--momentum_teacher_end", default=1.0, type=utils.unit_interval,
                        help="Teacher momentum at the end of training (DINO: 1, a teacher frozen at "
                             "the end). A short run whose cosine ends at 1 freezes the teacher early; "
                             "ending below 1 keeps it following the student.")
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
                        help="bf16 autocast on CPU: faster on CPUs with native bf16 (AVX512_BF16, "
                             "AMX), less exact. Elsewhere bf16 is emulated and far slower: a "
                             "warning, and training runs in fp32.")
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
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                        help="adamw is DINO's recommendation for ViTs (its third choice, lars, "
                             "is for convnets only).")
    parser.add_argument("--sparo_query_lr_mult", default=1.0, type=utils.positive_float,
                        help="SPARO only: the slot queries' learning rate as a multiple of the "
                             "schedule's (their own weight-decayed optimizer group; 1 = one group "
                             "for all weights, as DINO). The queries start N(0, 1), about 50x "
                             "the scale of the ViT's weights, so at equal lr they move relatively "
                             "slowly; RESULTS.md measures 10.")
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
    parser.add_argument("--device", default="auto", choices=devices.DEVICE_CHOICES,
                        help="auto: CUDA when usable; an error when GPUs are visible but CUDA "
                             "cannot use them. cuda: require a GPU. cpu: never use a GPU.")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Ignored; torchrun sets LOCAL_RANK.")
    knn_monitor.add_args(parser)  # --eval_every, --eval_data_path, ...
    warm_start.add_args(parser)  # --init_backbone, --init_checkpoint_key, --freeze_backbone_epochs
    return parser


def prototype_count(value: str) -> int:
    """argparse type of --out_dim: with one prototype the loss is exactly 0."""
    number = utils.positive_int(value)
    if number < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {number}: with one prototype "
                                         f"the loss is exactly 0 and nothing is learned")
    return number


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
                epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the loss, the mean entropy of the teacher's distributions): log(out_dim) means
        uniform outputs, DINO's collapse signature; cheap next to the forward pass."""
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        student_logp = student_logp.view(self.ncrops, -1, student_logp.shape[-1])
        temp = float(self.teacher_temp_schedule[epoch])
        teacher_p = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach()
        teacher_entropy = -(teacher_p * torch.log(teacher_p + 1e-12)).sum(-1).mean()
        teacher_p = teacher_p.view(2, -1, teacher_p.shape[-1])

        # sum over pairs (i, v != i) of q_i . log p_v = (sum_i q_i) . (sum_v log p_v)
        #                                               - sum_i q_i . log p_i
        all_pairs = (teacher_p.sum(0) * student_logp.sum(0)).sum(-1)
        same_view = (teacher_p * student_logp[:2]).sum(-1).sum(0)
        n_pairs = 2 * (self.ncrops - 1)
        loss = -(all_pairs - same_view).mean() / n_pairs
        self.update_center(teacher_output)
        return loss, teacher_entropy

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the whole (all-process) batch."""
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        if utils.is_dist_avail_and_initialized():
            dist.all_reduce(batch_center)
        batch_center /= len(teacher_output) * utils.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class StepResult(NamedTuple):
    """What one training step computed, on the device (nothing is synchronised)."""
    loss: torch.Tensor  # 0-d
    teacher_entropy: torch.Tensor  # 0-d, DINOLoss's
    slot_attention: Optional[torch.Tensor]  # SPARO: the teacher's on the first global crops (B, L, N)


# =============================================================================== helpers
class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; training must stop before anything is saved."""


class StepStatsTracker:
    """Collects per-iteration loss and teacher entropy on the device and checks them in windows.

    Reading a value forces a host-device sync, so it happens once per print interval, not per
    iteration, in one copy (tests/test_sync_free.py counts it). A non-finite loss in a window is
    found on every rank together (an all-reduce on the device, before the copy) so that all
    processes stop at the same step.
    """

    def __init__(self) -> None:
        self.window: List[torch.Tensor] = []  # one (loss, teacher entropy) pair per iteration
        self.window_start = 0
        self.totals = torch.zeros(3, dtype=torch.float64)  # loss sum, entropy sum, count

    def add(self, loss: torch.Tensor, teacher_entropy: torch.Tensor) -> None:
        self.window.append(torch.stack([loss.detach().float(), teacher_entropy.float()]))

    def flush(self, epoch: int, next_iteration: int,
              carry: Sequence[torch.Tensor] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Check and clear the window; return its (iterations, 2) losses and teacher entropies
        (float64, on the CPU), one row per iteration since the last flush, and the `carry`
        tensors (other device values the print window reads) on the CPU, all in one copy."""
        values = torch.stack(self.window).float()
        bad = (~torch.isfinite(values[:, 0])).any().float().reshape(1)
        if utils.is_dist_avail_and_initialized():
            reduced = bad.to(utils.collective_device())
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
            bad = reduced.to(bad.device)
        host = torch.cat([values.flatten(), bad, *(t.float().flatten() for t in carry)])
        host = host.to("cpu", torch.float64, copy=True)  # the print window's one device-to-host copy
        sizes = [values.numel(), 1, *(t.numel() for t in carry)]
        flat_values, bad, *carried = host.split(sizes)
        values = flat_values.view(-1, 2)
        losses = values[:, 0]
        if bad.item() > 0:
            nonfinite = torch.nonzero(~torch.isfinite(losses))
            first = int(nonfinite[0]) if len(nonfinite) else 0
            what = f"loss is {losses[first].item()}" if len(nonfinite) else "another process's loss is not finite"
            raise NonFiniteLoss(f"{what} at epoch {epoch}, iteration {self.window_start + first}; "
                                f"stopping without saving")
        self.totals += torch.tensor([losses.sum().item(), values[:, 1].sum().item(), len(values)],
                                    dtype=torch.float64)
        self.window, self.window_start = [], next_iteration
        return values, [c.view(t.shape).to(t.dtype) for c, t in zip(carried, carry)]

    def epoch_means(self) -> Tuple[float, float]:
        """Mean loss and mean teacher entropy over the epoch and all processes."""
        totals = utils.over_ranks(self.totals)
        count = max(float(totals[2]), 1.0)
        return float(totals[0]) / count, float(totals[1]) / count


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot train, with one clear line each. (The range of
    each single flag is checked where it is parsed, by its argparse type.)"""
    for name in ("global_crops_size", "local_crops_size"):
        size = getattr(args, name)
        if size % args.patch_size:
            raise errors.UserError(f"--{name} {size} is not a multiple of --patch_size {args.patch_size}")
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(args, name)
        if not 0 < low <= high:
            raise errors.UserError(f"--{name} takes MIN MAX with 0 < MIN <= MAX <= 1, got {low} {high}")
    if args.epochs > utils.MAX_TRAINING_STEPS:  # an epoch has at least one; checked again per step
        raise errors.UserError(f"--epochs {args.epochs} is more than the {utils.MAX_TRAINING_STEPS} "
                               f"iterations a run may have; give a real number of epochs")
    if args.warmup_epochs >= args.epochs:
        print(f"Note: --warmup_epochs {args.warmup_epochs} >= --epochs {args.epochs}: the learning "
              f"rate warms up for the whole run and never decays.")
    if args.sparo_query_lr_mult != 1 and args.readout != "sparo":
        raise errors.UserError(f"--sparo_query_lr_mult {args.sparo_query_lr_mult} scales SPARO's slot "
                               f"queries, which --readout {args.readout} does not have")
    knn_monitor.check_args(args)
    warn_suspicious_args(args)


def warn_suspicious_args(args: argparse.Namespace) -> None:
    """Legal values that usually train nothing useful: a warning each, training goes on."""
    warnings = []
    if args.momentum_teacher == 1 and args.momentum_teacher_end == 1:
        warnings.append("--momentum_teacher 1 never updates the teacher from the student")
    if args.momentum_teacher_end < args.momentum_teacher:
        warnings.append(f"--momentum_teacher_end {args.momentum_teacher_end} is below --momentum_teacher "
                        f"{args.momentum_teacher}: the teacher follows the student more closely as training ends")
    if max(args.teacher_temp, args.warmup_teacher_temp) >= STUDENT_TEMP:
        warnings.append(f"a teacher temperature of {max(args.teacher_temp, args.warmup_teacher_temp)} is "
                        f"not below the student's {STUDENT_TEMP}: the teacher does not sharpen and "
                        f"DINO tends to collapse")
    if args.min_lr > args.lr:
        warnings.append(f"--min_lr {args.min_lr} is above --lr {args.lr}: the cosine schedule rises")
    for warning in warnings:
        print(f"Warning: {warning}.", file=sys.stderr, flush=True)


# Copies of every weight a training step keeps: student, gradient, teacher, AdamW's two moments.
WEIGHT_COPIES = 5


def check_model_fits(args: argparse.Namespace) -> None:
    """Refuse a model whose weights alone cannot fit in the device's memory (with SPARO the
    DINO head's input is L*V wide) instead of dying later in the allocator. The model is built
    on the meta device, which allocates nothing; activations are not counted: a CUDA
    out-of-memory error in the first step explains those (explain_out_of_memory). Needs
    args.device, so it runs in the job, not in the launcher's early check_args."""
    with torch.device("meta"):
        student = build_student_teacher(args)[0]
    head = sum(p.numel() for p in student.head.parameters())
    total = sum(p.numel() for p in student.parameters())
    needed, available = total * 4 * WEIGHT_COPIES, devices.device_memory_bytes(args.device)
    if needed > available:
        width = f"{student.backbone.num_features}"
        if args.readout in vits.WIDE_READOUTS:
            width = f"--sparo_slots {args.sparo_slots} x --sparo_dim {args.sparo_dim} = {width}"
        raise errors.UserError(
            f"the model does not fit: the DINO head has {head / 1e6:.0f}M of its {total / 1e6:.0f}M "
            f"parameters (input width {width}, --out_dim {args.out_dim}); training needs "
            f"{needed / 2**30:.1f} GiB for weights, gradients, teacher and AdamW state, more than "
            f"the {available / 2**30:.1f} GiB of {args.device.type.upper()} memory here")


def autocast_context(args: argparse.Namespace) -> Tuple[Callable[[], Any], torch.amp.GradScaler]:
    """(autocast context factory, grad scaler); the scaler is enabled for fp16 only (DINO's
    loss scaling) and passes everything through otherwise."""
    dtype = devices.autocast_dtype(args.device, args.use_fp16, args.cpu_bf16)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return (lambda: devices.autocast(args.device, args.use_fp16, args.cpu_bf16)), scaler


def precision(args: argparse.Namespace) -> str:
    """The precision of the network passes, in words (the start line)."""
    dtype = devices.autocast_dtype(args.device, args.use_fp16, args.cpu_bf16)
    return {None: "fp32", torch.bfloat16: "bf16 autocast",
            torch.float16: "fp16 autocast, loss scaling"}[dtype]


def fall_back_from_emulated_bf16(args: argparse.Namespace) -> Optional[str]:
    """--cpu_bf16 on a CPU without native bf16 would emulate it, far slower than fp32
    (BENCHMARKS.md): one warning, and the run trains in fp32 (args.cpu_bf16 becomes false, so
    the checkpoint records what trained). Returns the reason, or None."""
    if not (args.cpu_bf16 and args.device.type == "cpu"):
        return None
    shortfall = devices.cpu_bf16_shortfall()
    if shortfall is not None:
        if utils.is_main_process():  # once per run, not once per process
            print(f"Warning: --cpu_bf16 ignored: {shortfall}; bf16 would be emulated, far slower "
                  f"than fp32. Training in fp32.", file=sys.stderr, flush=True)
        args.cpu_bf16 = False
    return shortfall


# ================================================================================= training
def build_data_loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    pipeline = augmentations.MultiCropGeometry if args.augment_on_device else DataAugmentationDINO
    transform = pipeline(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                         args.global_crops_size, args.local_crops_size)
    dataset = datasets.build_dataset(args.data_path, "pretrain", transform, subset=args.subset, grey=True,
                                  lazy=args.augment_on_device)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=args.world_size,
                                                  rank=args.rank, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
        pin_memory=args.device.type == "cuda", drop_last=True)
    if len(loader) == 0:
        raise errors.UserError(f"--batch_size_per_gpu {args.batch_size_per_gpu} x {args.world_size} "
                               f"process(es) is larger than the data set ({len(dataset)} images)")
    print(f"Data loaded: there are {len(dataset)} images.")
    return loader


def build_student_teacher(args: argparse.Namespace) -> Tuple[nn.Module, nn.Module, Dict[str, Any], Dict[str, Any]]:
    config = vits.BackboneConfig.from_args(args)
    student_backbone = config.build(drop_path_rate=args.drop_path_rate)
    teacher_backbone = config.build()
    head_config = dict(in_dim=student_backbone.num_features, out_dim=args.out_dim, use_bn=args.use_bn_in_head,
                       norm_last_layer=args.norm_last_layer, hidden_dim=args.head_hidden_dim,
                       bottleneck_dim=args.head_bottleneck_dim)
    student = MultiCropWrapper(student_backbone, DINOHead(**head_config))
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(**head_config))
    if args.cpu_bf16 and args.device.type == "cpu":
        # torch's CPU flash attention is slow in bf16 on short token sequences (BENCHMARKS.md,
        # the CPU quality recipe); the explicit q.k^T softmax runs in AMX matmuls.
        for backbone in (student_backbone, teacher_backbone):
            vits.set_fused_attention(backbone, False)
    return student, teacher, config.to_dict(), head_config


def check_resume_compatible(checkpoint: Dict[str, Any], config: Dict[str, Any],
                            head_config: Dict[str, Any], path: Path) -> None:
    stored = [checkpoint.get(key) or {} for key in ("model_config", "head_config")]
    if not all(isinstance(part, dict) for part in stored):
        raise errors.UserError(f"{path}: its model_config or head_config is not a mapping (a damaged "
                               f"checkpoint); use another --output_dir or restore the file")
    saved = {**stored[0], **stored[1]}
    wanted = {**config, **head_config}
    differing = [f"{k} ({errors.shown(saved[k])} saved, {wanted[k]!r} asked)" for k in wanted
                 if k in saved and saved[k] != wanted[k]]
    if differing:
        raise errors.UserError(f"{path} belongs to a different run: {'; '.join(differing)}. "
                               f"Use another --output_dir or the same arguments.")


def check_same_query_lr_mult(optimizer_state: Dict[str, Any], asked: float, path: Path) -> None:
    """The slot queries' optimizer group (utils.get_params_groups) is part of the optimizer's
    layout, so --sparo_query_lr_mult cannot change on resume."""
    multipliers = [group["lr_mult"] for group in optimizer_state.get("param_groups", []) if "lr_mult" in group]
    saved = multipliers[0] if multipliers else 1.0
    if saved != asked:
        raise errors.UserError(f"{path} was trained with --sparo_query_lr_mult {saved}: resume with "
                               f"that value, or use another --output_dir")


# Arguments a resumed run may change on purpose (the model's cannot change: see above).
NOTED_ON_RESUME = ("lr", "min_lr", "data_path", "subset", "batch_size_per_gpu", "epochs",
                   "warmup_epochs", "weight_decay", "weight_decay_end", "momentum_teacher",
                   "momentum_teacher_end", "teacher_temp", "optimizer", "seed")


def note_changed_args(saved: Any, args: argparse.Namespace) -> None:
    """One line naming the training arguments that differ from the checkpoint's: allowed
    (users change them on purpose), but never silently."""
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else (saved or {})
    now = utils.plain(args)
    changed = [f"--{k} {now[k]} (was {saved[k]})" for k in NOTED_ON_RESUME
               if k in saved and k in now and saved[k] != now[k]]
    if changed:
        print(f"Note: resuming with changed arguments: {', '.join(changed)}.", flush=True)


class Models(NamedTuple):
    """The networks of a run. The optimizer, the EMA and checkpoints see the plain modules."""
    student: nn.Module  # what a step runs: student_without_ddp, wrapped in DDP when distributed
    student_without_ddp: MultiCropWrapper
    teacher: MultiCropWrapper  # the EMA of the student, never wrapped (it gets no gradients)
    config: Dict[str, Any]  # the backbone's model_config, saved with every checkpoint
    head_config: Dict[str, Any]


class Optimisation(NamedTuple):
    dino_loss: DINOLoss  # holds the centre of the teacher's outputs (saved and resumed)
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], Any]  # a new autocast (or null) context for each step
    fp16_scaler: torch.amp.GradScaler  # enabled for fp16 on CUDA only


def build_training(args: argparse.Namespace, resuming: bool = False) -> Tuple[Models, Optimisation]:
    """The student and its teacher (a copy without gradients), DINO's loss, the optimizer,
    autocast and loss scaling, on args.device: what main_dino_sparo.py and the benchmarks train.
    --init_backbone is loaded unless the run resumes (it keeps its own weights)."""
    student, teacher, config, head_config = build_student_teacher(args)
    if args.init_backbone and not resuming:  # before the teacher copies the student
        warm_start.init_backbone(student.backbone, args.init_backbone, args.init_checkpoint_key)
    student, teacher = student.to(args.device), teacher.to(args.device)
    if args.use_bn_in_head and args.distributed:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs).to(args.device)
    optimizer = utils.build_optimizer(args.optimizer,
                                      utils.get_params_groups(student, args.sparo_query_lr_mult))
    return (Models(student, student, teacher, config, head_config),
            Optimisation(dino_loss, optimizer, *autocast_context(args)))


def build_schedules(args: argparse.Namespace, iters_per_epoch: int) -> Dict[str, np.ndarray]:
    """DINO's per-iteration schedules: the learning rate (scaled linearly with the total batch,
    warm-up then cosine), the weight decay and the teacher's momentum (cosines)."""
    total_batch = args.batch_size_per_gpu * args.world_size
    return dict(
        lr=utils.cosine_scheduler(args.lr * total_batch / 256.0, args.min_lr, args.epochs,
                                  iters_per_epoch, warmup_epochs=args.warmup_epochs),
        wd=utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch),
        momentum=utils.cosine_scheduler(args.momentum_teacher, args.momentum_teacher_end, args.epochs,
                                        iters_per_epoch))


def resume_from_checkpoint(path: Path, checkpoint: Dict[str, Any], models: Models,
                           optimisation: Optimisation, args: argparse.Namespace) -> Tuple[int, List[Dict[str, Any]]]:
    """Load the checkpoint into the plain modules; returns the epoch to start from and the log
    of the epochs it holds."""
    check_resume_compatible(checkpoint, models.config, models.head_config, path)
    models.student_without_ddp.load_state_dict(checkpoint["student"])
    models.teacher.load_state_dict(checkpoint["teacher"])
    check_same_query_lr_mult(checkpoint["optimizer"], args.sparo_query_lr_mult, path)
    try:
        optimisation.optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:  # e.g. a separate-values SPARO run saved with its key bias
        raise errors.UserError(f"{path}: its optimizer state does not fit this model's "
                               f"parameters ({error}); was it written by an older version of this "
                               f"code? Resume it with that version, or use another --output_dir") from None
    optimisation.dino_loss.load_state_dict(checkpoint["dino_loss"])
    if checkpoint.get("fp16_scaler"):
        optimisation.fp16_scaler.load_state_dict(checkpoint["fp16_scaler"])  # ignored when disabled
    print(f"Resuming from {path} at epoch {checkpoint['epoch']}.")
    note_changed_args(checkpoint.get("args"), args)
    return int(checkpoint["epoch"]), run_folder.saved_history(checkpoint, path.parent)


def set_up_training(args: argparse.Namespace, output_dir: Path) -> Tuple[Models, Optimisation, int, List[Dict[str, Any]]]:
    """build_training, resumed from output_dir's checkpoint if any: (models, optimisation,
    start epoch, log of the epochs done).

    The checkpoint is loaded before the DDP wrap, and every rank must resume from the same
    epoch (a node-local --output_dir would train diverging models and hang at the end). A fresh
    teacher is copied from the student after the wrap (as in DINO): the wrap broadcasts rank
    0's student, so every rank starts with the same student and teacher.
    """
    found = run_folder.find_resume_checkpoint(output_dir)  # the one rule for "is this a resume"
    if found and args.init_backbone:
        print(f"--init_backbone {args.init_backbone} is not applied: {output_dir} holds a run to resume.")
    models, optimisation = build_training(args, resuming=found is not None)
    print(f"Student and teacher are {args.arch} with readout={args.readout} "
          f"(encoding width {models.student.backbone.num_features}, "
          f"{sum(p.numel() for p in models.student.backbone.parameters()) / 1e6:.2f}M backbone parameters).")
    start_epoch, history = resume_from_checkpoint(*found, models, optimisation, args) if found else (0, [])
    first, last = utils.min_max_over_ranks(start_epoch)
    if first != last:
        raise errors.UserError(
            f"the processes found different checkpoints in {output_dir} (epochs {first:.0f} to "
            f"{last:.0f}; this rank: {start_epoch}): --output_dir must be one folder shared by all nodes")
    if args.distributed:
        models = models._replace(student=nn.parallel.DistributedDataParallel(
            models.student, device_ids=[args.gpu] if args.device.type == "cuda" else None))
        if start_epoch == 0:  # checkpoints hold at least one epoch
            models.teacher.load_state_dict(models.student_without_ddp.state_dict())
    return models, optimisation, start_epoch, history


def checkpoint_state(models: Models, optimisation: Optimisation, epoch: int, args: argparse.Namespace,
                     history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """DINO's checkpoint layout, plus model_config, head_config and the epochs' log."""
    scaler = optimisation.fp16_scaler
    return dict(student=models.student_without_ddp.state_dict(), teacher=models.teacher.state_dict(),
                optimizer=optimisation.optimizer.state_dict(), epoch=epoch + 1, args=utils.plain(args),
                dino_loss=optimisation.dino_loss.state_dict(),
                fp16_scaler=scaler.state_dict() if scaler.is_enabled() else None,
                model_config=models.config, head_config=models.head_config, train_log=history)


def train_dino(args: argparse.Namespace) -> None:
    utils.init_distributed_mode(args)
    devices.enable_fast_fp32(args.device)
    check_args(args)
    bf16_shortfall = fall_back_from_emulated_bf16(args)
    check_model_fits(args)
    if args.augment_on_device is None:  # resolved here, so the checkpoint's args record it
        args.augment_on_device = augmentations.default_on_device(args.device)
    utils.fix_random_seeds(args.seed + args.rank)
    data_loader = build_data_loader(args)  # before creating anything: bad data changes no files
    schedules = build_schedules(args, len(data_loader))
    monitor = knn_monitor.KnnMonitor(args, args.global_crops_size) if args.eval_every else None
    output_dir = Path(args.output_dir)
    with run_folder.opened(output_dir):
        models, optimisation, start_epoch, history = set_up_training(args, output_dir)
        run_folder.rewrite_log(output_dir, history)
        if start_epoch >= args.epochs:
            print(f"Nothing to do: {output_dir} already holds {start_epoch} of {args.epochs} epochs.")
            return
        run_folder.record_start(args, output_dir, get_args_parser(), start_epoch)
        # Printed once the set-up checks passed, so that an error is the last line of a failed start.
        print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
        board = tensorboard_log.TrainingBoard(output_dir, first_step=start_epoch * len(data_loader),
                                              enabled=args.tensorboard and utils.is_main_process())
        start_time = time.time()  # the closing "Training time" includes the baselines' k-NN
        if monitor is not None and start_epoch == 0:  # reads every evaluation image before epoch 0
            monitor.measure_baselines(models.teacher.backbone, args.eval_raw_pixels, output_dir)
        fallback = f", --cpu_bf16 ignored: {bf16_shortfall}" if bf16_shortfall else ""
        print(f"Starting DINO training! (augmentation: "
              f"{'photometric on ' + args.device.type if args.augment_on_device else 'PIL in the loader'}) "
              f"(precision: {precision(args)}{fallback})")
        train_epochs(TrainStep(models, optimisation, args, first_epoch=start_epoch), data_loader,
                     schedules, board, monitor, history, args, start_time)


def train_epochs(train_step: TrainStep, data_loader: torch.utils.data.DataLoader,
                 schedules: Dict[str, np.ndarray], board: tensorboard_log.TrainingBoard,
                 monitor: Optional[knn_monitor.KnnMonitor], history: List[Dict[str, Any]],
                 args: argparse.Namespace, start_time: float) -> None:
    """Train from train_step.first_epoch to --epochs, each epoch ending with its k-NN figures
    (when due), its checkpoint and its line in log.txt; "Training time" counts from start_time."""
    models, output_dir = train_step.models, Path(args.output_dir)
    for epoch in range(train_step.first_epoch, args.epochs):
        # Seeding every epoch makes a resumed run draw the same crops as an uninterrupted one.
        utils.fix_random_seeds(args.seed + 7919 * epoch + args.rank)
        data_loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        train_stats = train_one_epoch(train_step, data_loader, schedules, epoch, args, board)
        board.flush()  # before the checkpoint: the curves on disk always reach it
        # epoch_seconds lets a run's training time be summed across resumes (the log is kept).
        history.append({**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                        "epoch_seconds": round(time.time() - epoch_start, 2)})
        if monitor is not None and monitor.due(epoch):
            networks = {"teacher": models.teacher.backbone}
            if args.eval_student:
                networks["student"] = models.student_without_ddp.backbone
            log_entries, scalars = monitor.evaluate_networks(epoch, networks)
            history[-1].update(log_entries)
            # at the epoch's last iteration: a resumed run's purge starts at the next one
            board.add_scalars(scalars, (epoch + 1) * len(data_loader) - 1)
            board.flush()
        run_folder.save_epoch(output_dir, checkpoint_state(models, train_step.optimisation, epoch, args, history),
                              args.saveckp_freq)
    board.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if monitor is not None:
        print(knn_monitor.summary(output_dir, history))


class TrainStep:
    """One DINO iteration: teacher and student forward, loss, backward, step, EMA."""

    def __init__(self, models: Models, optimisation: Optimisation, args: argparse.Namespace,
                 first_epoch: int = 0) -> None:
        """first_epoch: the epoch this process starts at (its first step explains a CUDA
        out-of-memory error)."""
        self.models, self.optimisation, self.args = models, optimisation, args
        self.first_epoch = first_epoch
        # --compile after the DDP wrap, so that dynamo splits the student's graph at DDP's
        # gradient buckets and the all-reduces still overlap the backward pass. Static shapes:
        # one graph per crop layout instead of slower shape-generic kernels.
        compiled = (lambda model: torch.compile(model, dynamic=False)) if args.compile else (lambda model: model)
        self.student, self.teacher = compiled(models.student), compiled(models.teacher)
        self.sparo = models.teacher.backbone.sparo is not None  # the teacher also returns its slot attention
        # The EMA pairs each teacher parameter with the student parameter of the same name.
        teacher_params = dict(models.teacher.named_parameters())
        ema_pairs = [(teacher_params[name], param)
                     for name, param in models.student_without_ddp.named_parameters()]
        self.teacher_ema = [t for t, _ in ema_pairs]
        self.student_ema = [s for _, s in ema_pairs]
        self.augment = augmentations.PhotometricAugmentation(args.local_crops_number, args.global_crops_size) \
            if args.augment_on_device else None

    def __call__(self, images: List[torch.Tensor], epoch: int, lr: float, wd: float,
                 momentum: float) -> StepResult:
        """Train on one batch of crops."""
        optimizer, scaler, student = self.optimisation.optimizer, self.optimisation.fp16_scaler, \
            self.models.student_without_ddp
        if self.augment is not None:  # uint8 crops from MultiCropGeometry
            images = self.augment(images)
        utils.set_lr_and_wd(optimizer, lr, wd)
        with self.optimisation.autocast():
            # Only the 2 global views. SPARO's attention (TensorBoard's slot statistics) comes on
            # every step: the head computes it anyway, and a flag set on print steps only would
            # compile the teacher twice (measured on CPU: returning it costs 1-3 % of its forward).
            with torch.no_grad():
                teacher_output = self.teacher(images[:2], slot_attention=self.sparo)
            teacher_output, attention = teacher_output if self.sparo else (teacher_output, None)
            student_output = self.student(images)
            loss, teacher_entropy = self.optimisation.dino_loss(student_output, teacher_output, epoch)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler passes everything through unless fp16
        scaler.unscale_(optimizer)  # clipping sees the true gradients
        if self.args.clip_grad:
            utils.clip_gradients(student, self.args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, student, self.args.freeze_last_layer)
        warm_start.cancel_gradients_frozen_backbone(epoch, student, self.args.freeze_backbone_epochs)
        scaler.step(optimizer)
        scaler.update()

        with torch.no_grad():  # teacher = m * teacher + (1 - m) * student
            torch._foreach_mul_(self.teacher_ema, momentum)
            torch._foreach_add_(self.teacher_ema, self.student_ema, alpha=1.0 - momentum)
        first_crops = None if attention is None else attention[:len(images[0])]
        return StepResult(loss.detach(), teacher_entropy.detach(), first_crops)


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
            result = train_step(images, epoch, float(schedules["lr"][step]), float(schedules["wd"][step]),
                                float(schedules["momentum"][step]))
        tracker.add(result.loss, result.teacher_entropy)
        if it % args.print_freq == 0 or it == iters - 1:
            window = end_window(tracker, result.slot_attention, train_step.optimisation.dino_loss, board,
                                schedules, epoch, it + 1, iters * epoch)
            metric_logger.meters["loss"].update(float(window[:, 0].mean()))
            metric_logger.update(lr=schedules["lr"][step], wd=schedules["wd"][step])
    epoch_steps = slice(iters * epoch, iters * (epoch + 1))
    loss, teacher_entropy = tracker.epoch_means()
    stats = dict(loss=loss, lr=float(schedules["lr"][epoch_steps].mean()),
                 wd=float(schedules["wd"][epoch_steps].mean()), teacher_entropy=teacher_entropy)
    print(f"Averaged stats: loss: {loss:.6f}  lr: {stats['lr']:.6f}  wd: {stats['wd']:.6f}  "
          f"teacher entropy: {teacher_entropy:.3f} (uniform: {math.log(args.out_dim):.3f})")
    warn_if_collapsed(teacher_entropy, args.out_dim, epoch)
    return stats


def end_window(tracker: StepStatsTracker, slot_attention: Optional[torch.Tensor], dino_loss: DINOLoss,
               board: tensorboard_log.TrainingBoard, schedules: Dict[str, np.ndarray], epoch: int,
               next_iteration: int, epoch_first_step: int) -> torch.Tensor:
    """The end of a print window, the only place where training waits for the device: the
    window's losses and teacher entropies, with the slot statistics of its last step's teacher
    (TensorBoard only), come to the host in one copy, are checked (StepStatsTracker.flush) and
    written to TensorBoard; returns the window's (iterations, 2) values."""
    first_step = epoch_first_step + tracker.window_start
    slots = tensorboard_log.slot_statistics(slot_attention) \
        if board.enabled and slot_attention is not None else {}
    window, carried = tracker.flush(epoch, next_iteration, carry=list(slots.values()))
    if not board.enabled:
        return window
    steps = slice(first_step, first_step + len(window))
    teacher_temp = float(dino_loss.teacher_temp_schedule[epoch])
    board.add_series({"train/loss": window[:, 0].tolist(), "train/teacher_entropy": window[:, 1].tolist(),
                      "train/lr": schedules["lr"][steps], "train/wd": schedules["wd"][steps],
                      "train/momentum": schedules["momentum"][steps],
                      "train/teacher_temp": [teacher_temp] * len(window)}, first_step)
    if slots:
        board.add_slot_statistics(dict(zip(slots, carried)), steps.stop - 1)
    return window


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
        raise errors.UserError(out_of_memory_message(str(error), base, peak, total,
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
    args = config_files.parse_args_with_config(parser, argv)
    try:
        train_dino(args)
    except NonFiniteLoss as error:
        saved = Path(args.output_dir) / run_folder.CHECKPOINT
        kept = (f"the last good checkpoint {saved} is untouched" if saved.exists()
                else "no checkpoint was written yet (the first epoch did not finish)")
        print(f"error: {error}; {kept}", file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    errors.run_main(main)
