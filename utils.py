"""DINO's infrastructure shared by every script: flag types, distributed set-up, schedules,
optimisation, atomic checkpoints, output folders and progress logging."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pickle
import random
import socket
import subprocess
import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: its functions take `group=group.WORLD`
# as a default argument, so importing it later (timm does) pins the default group for good;
# destroy_process_group() then cannot free it, gloo's worker threads outlive the interpreter and
# a rank can abort at exit ("terminate called without an active exception").
import torch.distributed.nn  # noqa: F401
from torch import nn

import devices
import errors
import failure_watch
import vision_transformer as vits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# =============================================================================== flags
def bool_flag(value: str) -> bool:
    """argparse type for on/off flags written like DINO's: --use_fp16 false."""
    lowered = str(value).lower()
    if lowered in {"on", "true", "1", "yes"}:
        return True
    if lowered in {"off", "false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {errors.shown(value)}")


def _number(value: Any, kind: Callable, what: str) -> Any:
    try:
        number = kind(str(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {errors.shown(value)}") from None
    return number


def positive_int(value: Any) -> int:
    """argparse type: an integer of at least 1 (sizes, counts, frequencies)."""
    number = _number(value, int, "a positive integer")
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {number}")
    return number


def non_negative_int(value: Any) -> int:
    """argparse type: an integer of at least 0 (0 meaning none or off)."""
    number = _number(value, int, "an integer of 0 or more")
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def positive_float(value: Any) -> float:
    """argparse type: a finite number above 0 (learning rates, temperatures)."""
    number = _number(value, float, "a positive number")
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def non_negative_float(value: Any) -> float:
    """argparse type: a finite number of at least 0 (weight decay, clipping; 0 = off)."""
    number = _number(value, float, "a number of 0 or more")
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of 0 or more, got {value}")
    return number


def unit_interval(value: Any) -> float:
    """argparse type: a number between 0 and 1 inclusive (momenta, rates, area fractions)."""
    number = _number(value, float, "a number between 0 and 1")
    if not 0 <= number <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, got {value}")
    return number


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    """The backbone's training flags: one per BackboneConfig field with a help text, under the
    field's name (--arch, --patch_size, --readout, --sparo_*)."""
    for option in dataclasses.fields(vits.BackboneConfig):
        if option.metadata:  # every numeric field is a size: positive
            kind = (None if option.metadata["choices"] else
                    bool_flag if isinstance(option.default, bool) else positive_int)
            parser.add_argument(f"--{option.name}", default=option.default, type=kind,
                                choices=option.metadata["choices"], help=option.metadata["help"])


def plain(value: Any) -> Any:
    """Arguments as plain Python (dicts, lists, str, numbers) so checkpoints load safely."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ========================================================================= distributed
def init_distributed_mode(args: argparse.Namespace) -> None:
    """Set args.rank, args.world_size, args.gpu, args.device and join the process group.

    Launched by torchrun (RANK/WORLD_SIZE), by Slurm's srun (SLURM_PROCID within a job step)
    or as a plain process (a group of one, no process group). NCCL on GPUs, gloo on CPU.
    args.device may hold the --device choice (auto, cuda or cpu; default auto).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        args.rank, args.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    elif _in_srun_step(env):
        # srun sets the step variables; sbatch alone sets SLURM_NTASKS and SLURM_PROCID=0 in
        # the batch script, which is one plain process, not rank 0 of a group.
        args.rank, args.world_size = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
        local_world = _slurm_tasks_on_this_node(env)
        if args.world_size > 1:
            env.setdefault("MASTER_ADDR", _slurm_master_address())
            env.setdefault("MASTER_PORT", str(_port_from_job_id(env.get("SLURM_JOB_ID", "0"))))
    else:
        args.rank, args.world_size, local_rank, local_world = 0, 1, 0, 1

    requested = getattr(args, "device", None)
    requested = requested.type if isinstance(requested, torch.device) else (requested or "auto")
    use_cuda = devices.resolve_use_cuda(requested)
    args.gpu = devices.choose_gpu(local_rank, local_world, own_gpu_per_task=_in_srun_step(env)
                                  and "RANK" not in env) if use_cuda else None
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    args.device = torch.device("cuda", args.gpu) if use_cuda else torch.device("cpu")
    args.distributed = args.world_size > 1
    if args.distributed and not dist.is_initialized():  # a caller may run several trainings in one group
        backend = "nccl" if use_cuda else "gloo"
        extra = dict(device_id=args.device) if use_cuda else {}
        dist.init_process_group(backend=backend, init_method=getattr(args, "dist_url", "env://"),
                                world_size=args.world_size, rank=args.rank,
                                timeout=datetime.timedelta(minutes=30), **extra)
        dist.barrier()
        failure_watch.watch_for_failures(args.rank, args.world_size)
    setup_for_distributed(args.rank == 0, args.rank if args.distributed else None)


def _in_srun_step(env: Any) -> bool:
    return "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def _slurm_tasks_on_this_node(env: Any) -> int:
    """Tasks of this srun step on this node (SLURM_STEP_TASKS_PER_NODE reads e.g. "4(x2),3")."""
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    node = int(env.get("SLURM_NODEID", 0))
    counts: List[int] = []
    for part in per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node] if node < len(counts) else counts[-1]


def _slurm_master_address() -> str:
    """The first host of the job's node list (scontrol expands "node[01-04]")."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") \
        or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], check=True,
                             capture_output=True, text=True).stdout.split()
        return out[0] if out else socket.gethostname()
    except (OSError, subprocess.CalledProcessError):
        pass
    if int(os.environ.get("SLURM_STEP_NUM_NODES", os.environ.get("SLURM_NNODES", "1"))) <= 1:
        return "127.0.0.1"
    if nodes and "[" not in nodes:
        return nodes.split(",")[0]
    # 127.0.0.1 would make every node wait for a rank 0 of its own until the timeout
    raise errors.UserError(f"cannot find the first node of {nodes!r} without scontrol; set MASTER_ADDR "
                           f"to rank 0's host name")


def _port_from_job_id(job_id: str) -> int:
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits[-4:]) % 20000


def setup_for_distributed(is_master: bool, rank: Optional[int] = None) -> None:
    """Silence print() on every rank but 0 (print(..., force=True) still prints), except
    errors and warnings (print(..., file=sys.stderr)): those come from every rank, prefixed
    with `[rank N]` when `rank` is given (a distributed run), so a failure on rank 3 is seen."""
    import builtins

    builtin_print = getattr(builtins, "_sparo_original_print", builtins.print)
    builtins._sparo_original_print = builtin_print

    def rank_aware_print(*args: Any, **kwargs: Any) -> None:
        force = kwargs.pop("force", False)
        to_stderr = kwargs.get("file") is sys.stderr
        if to_stderr and rank is not None:
            args = (f"[rank {rank}]",) + args
        if is_master or force or to_stderr:
            builtin_print(*args, **kwargs)

    builtins.print = rank_aware_print


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the GPU with NCCL, the CPU with gloo."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def over_ranks(values: Any, op: str = "sum") -> torch.Tensor:
    """The one rank-agreement mechanism: `values` (numbers or a tensor) combined over every
    rank by one all-reduce (op: sum, min or max), as float64 on the CPU; the values themselves
    when not distributed. Checks that every rank must pass or fail together decide on this, so
    that no rank stops alone while the others wait for it in the next collective. A NaN or an
    infinity of any rank survives a sum."""
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1)
    if is_dist_avail_and_initialized():
        tensor = tensor.to(collective_device(), copy=True)  # all_reduce works in place: never on the caller's
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
    return tensor.cpu()


def min_max_over_ranks(value: float) -> Tuple[float, float]:
    """The smallest and the largest `value` over all ranks (one all-reduce)."""
    low, negated_high = over_ranks([value, -value], "min").tolist()
    return low, -negated_high


def stop_together(error: Optional[errors.UserError]) -> None:
    """Raise `error` on the rank that met it and a UserError on every other rank, so that a
    check made by one rank (e.g. rank 0's output folder) stops the whole run, not only that
    rank while the others wait for it."""
    failed = over_ranks([error is not None], "max").item()
    if error is not None:
        raise error
    if failed:
        raise errors.UserError("another process stopped at set-up (its error is printed above)")


def result_from_main(compute: Callable[[], Any]) -> Any:
    """compute() on rank 0 only, and its (picklable) result on every rank. The other ranks wait
    on the store, not in a collective, so that no collective timeout (30 min) ends a long
    computation (eval_knn --select_slots on ImageNet); if rank 0 fails, the failure watch ends
    them."""
    global _results_shared
    if not is_dist_avail_and_initialized():
        return compute()
    key = f"sparo_dino/result/{_results_shared}"  # the same sequence of calls on every rank
    _results_shared += 1
    store = dist.distributed_c10d._get_default_store()
    if get_rank() == 0:
        result = compute()
        store.set(key, pickle.dumps(result))
        return result
    while not store.check([key]):
        time.sleep(0.5)
    return pickle.loads(store.get(key))


_results_shared = 0


def cleanup_distributed() -> None:
    """Leave the process group. Called from `finally:` blocks: when an exception is on its way
    out of this process, the other ranks are told first and a hang on the way out is ended
    (failure_watch.stop_watching)."""
    failure_watch.stop_watching(sys.exc_info()[1])
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def fix_random_seeds(seed: int = 31) -> None:
    """Seed torch, numpy and random (each rank passes its own seed)."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# =========================================================================== schedules
# The most iterations a run may have: a schedule holds a float64 per iteration (1.5 GiB at the
# limit); DINO's longest recipe, 800 ImageNet epochs, has about a million.
MAX_TRAINING_STEPS = 200_000_000


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """One value per iteration: linear warm-up, then a cosine from base_value to final_value."""
    if epochs * niter_per_ep > MAX_TRAINING_STEPS:
        raise errors.UserError(f"{epochs} epochs of {niter_per_ep} iterations are more than {MAX_TRAINING_STEPS} "
                               f"steps; use fewer epochs or a larger batch")
    warmup_iters = min(warmup_epochs * niter_per_ep, epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * steps / max(len(steps), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# ======================================================================== optimisation
SLOT_QUERY_PARAMETER = "sparo.queries"  # SparoReadout's q_l, as named inside a backbone

def get_params_groups(model: nn.Module, slot_query_lr_mult: float = 1.0) -> List[Dict[str, Any]]:
    """DINO's two groups: biases and 1-D parameters (norms) get no weight decay. With
    slot_query_lr_mult != 1, SPARO's slot queries get a third, weight-decayed group whose
    learning rate is that multiple of the schedule's (its "lr_mult"); with the default the
    groups are DINO's, so checkpoints keep their optimizer layout."""
    regularized, not_regularized, queries = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if slot_query_lr_mult != 1.0 and name.endswith(SLOT_QUERY_PARAMETER):
            queries.append(param)
        elif name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    groups = [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]
    if queries:
        groups.append({"params": queries, "lr_mult": slot_query_lr_mult, "decayed": True})
    return groups


def set_lr_and_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """One iteration's schedule values: every group's lr (times its lr_mult), and the weight
    decay of the regularised groups (the first, DINO's, and any marked "decayed")."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr * group.get("lr_mult", 1.0)
        if i == 0 or group.get("decayed"):
            group["weight_decay"] = wd


def build_optimizer(name: str, params_groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    """adamw (fused kernel, else foreach) or sgd; lr and wd are set per iteration. (DINO's
    third choice, LARS, is for convnets only: this repository trains ViTs.)"""
    if name == "adamw":
        try:  # one fused kernel for all parameters (CPU and CUDA since torch 2.4)
            return torch.optim.AdamW(params_groups, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(params_groups, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9, foreach=True)
    raise errors.UserError(f"unknown optimizer {name!r}: choose adamw or sgd")


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's per-parameter clipping: each gradient's norm is capped at `clip` on its own
    (multiplied by clip / (norm + 1e-6) where that is below 1, as in DINO). The factors of
    all parameters are computed as one vector: a few ops per step instead of a few per
    parameter, and no value is read on the host (DINO's `if clip_coef < 1` reads one per
    parameter; multiplying by 1 instead changes nothing)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    factors = (clip / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, factors.unbind())


def cancel_gradients(epoch: int, model: nn.Module, until_epoch: int, selects: Callable[[str], bool]) -> None:
    """Drop the gradients of the parameters whose names `selects` accepts during the first
    `until_epoch` epochs, so the optimiser leaves them as they are (DINO's way to freeze)."""
    if epoch >= until_epoch:
        return
    for name, param in model.named_parameters():
        if selects(name):
            param.grad = None


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Keep DINO's prototype layer fixed during the first `freeze_last_layer` epochs."""
    cancel_gradients(epoch, model, freeze_last_layer, lambda name: "last_layer" in name)


# ========================================================================= checkpoints
TEMPORARY_MARK = ".tmp."  # in the names of replacing's temporary files: .NAME.tmp.PID.SUFFIX


def remove_stale_temporary_files(folder: Path) -> None:
    """Delete the temporary files of `replacing` that a killed writer left in `folder`."""
    for stale in Path(folder).glob(f".*{TEMPORARY_MARK}*"):
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: str | Path, failures: Tuple[type, ...] = (OSError,)) -> Iterator[Path]:
    """Write `path` whole or not at all: the block writes the yielded temporary file (same
    folder, same suffix), which replaces `path` when the block ends without an error. A
    failure of the kinds given (a full disk, a read-only folder) is a UserError naming `path`,
    whose previous version is kept; the temporary file never stays behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except failures as error:
        raise errors.UserError(write_error(path, error)) from error
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through `replacing`, verified and fsynced before the rename.

    A crash at any moment leaves either the old file or the new one, never a torn file; the
    temporary file is read back (memory-mapped, so cheaply) before it replaces anything.
    """
    path = Path(path)
    # a full disk: torch says `unexpected pos` (a RuntimeError)
    with replacing(path, failures=(OSError, RuntimeError)) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file through `replacing`: never a torn file; a full disk is a
    UserError naming the file, which keeps its previous content."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_error(path: Path, error: BaseException) -> str:
    """One line for a file that could not be written (full disk, read-only folder, ...)."""
    reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:200]
    kept = " (its previous version is kept)" if path.exists() else ""
    return f"cannot write {path}: {reason}{kept}; free space or choose a writable folder"


def save_on_master(obj: Any, path: str | Path) -> None:
    if is_main_process():
        atomic_save(obj, path)


# ====================================================================== progress logs
class SmoothedValue:
    """A windowed median/average and the global average of a series of values."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque: deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        count, total = over_ranks([self.count, self.total]).tolist()
        self.count, self.total = int(count), total

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               value=self.value)


class MetricLogger:
    """DINO-style progress: `Epoch: [0/10] [ 40/312] eta: 0:01:02 loss: ... ` lines."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters[name].update(float(value))

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Sized, print_freq: int, header: str = "",
                  samples_per_iter: int = 0,
                  on_print: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Iterator[Any]:
        """Yield from iterable, printing DINO's progress line every print_freq steps: ETA, the
        meters, `time` (mean seconds per iteration), `data` (mean seconds of it spent waiting
        for the next batch: a data-loading bottleneck shows here), `max mem` (MiB, peak_memory_mib)
        and, this project's addition, `img/s` over the last print window. on_print(i, speed)
        receives the printed figures (`speed/...` and `memory/...` names) after each line."""
        total = len(iterable)
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = last = end = time.time()
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                now = time.time()
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                max_mem = devices.peak_memory_mib()
                parts = [header, f"[{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}", f"max mem: {max_mem:.0f}"]
                speed = {"speed/iter_seconds": iter_time.avg, "speed/data_seconds": data_time.avg,
                         "memory/max_mem_mib": max_mem}
                if samples_per_iter and i > 0:
                    steps = i % print_freq or print_freq
                    speed["speed/img_per_s"] = samples_per_iter * steps / max(now - last, 1e-9)
                    parts.append(f"img/s: {speed['speed/img_per_s']:.1f}")
                print(self.delimiter.join(p for p in parts if p), flush=True)
                if on_print is not None:
                    on_print(i, speed)
                last = now
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{header} Total time: {elapsed} ({(time.time() - start) / max(total, 1):.4f} s / it)",
              flush=True)


Sized = Any  # an iterable with len(); kept loose for DataLoaders


def ensure_output_dir(path: str | Path, flag: str) -> Path:
    """Create an output folder before any long work, so that a path that cannot be written
    fails in the first second with one line instead of after hours of computation."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise errors.UserError(f"cannot create {flag} {folder}: {error.strerror}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise errors.UserError(f"{flag} {folder} is not writable")
    return folder


def ensure_output_file(path: str | Path, flag: str) -> Path:
    """The folder of an output file (--output_json), checked like ensure_output_dir."""
    file = Path(path)
    if file.is_dir():
        raise errors.UserError(f"{flag} {file} is a folder, not a file")
    ensure_output_dir(file.parent, f"the folder of {flag}")
    return file


def write_json_line(path: str | Path, record: Dict[str, Any]) -> None:
    """Append one JSON record (one line) to a log file; a full disk is a UserError."""
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        raise errors.UserError(write_error(Path(path), error)) from error

