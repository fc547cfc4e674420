"""Helpers shared by every script: flags and configs, distributed set-up,
schedules, optimisation, checkpoints, weight loading and progress logging."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import json
import math
import os
import pickle
import platform
import random
import reprlib
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors_file
import torch.distributed as dist
# Imported before any process group exists, on purpose: its functions take `group=group.WORLD`
# as a default argument, so importing it later (timm does) pins the default group for good;
# destroy_process_group() then cannot free it, gloo's worker threads outlive the interpreter and
# a rank can abort at exit ("terminate called without an active exception").
import torch.distributed.nn  # noqa: F401
from torch import nn

import vision_transformer as vits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with a non-zero exit."""


MAX_MESSAGE_CHARS = 2000  # a message quoting a huge value stays one readable line
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main(); a UserError, or a full or read-only disk met by a writer without
    its own message, becomes one clear line and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {capped(user_error_message(error))}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if error.errno not in DISK_ERRORS:
            raise
        print(f"error: cannot write{f' {error.filename}' if error.filename else ''}: {error.strerror}; "
              f"free space (or use a writable folder) and rerun", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def capped(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """message, cut to `limit` characters with a note of how much was left out."""
    return message if len(message) <= limit else \
        f"{message[:limit]}... ({len(message) - limit} more characters left out)"


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """repr() of a value read from a user's file for an error message, bounded in size and in
    work (a YAML alias bomb's value is a small graph whose full repr is gigabytes)."""
    return _SHOWN.repr(value)


def user_error_message(error: UserError) -> str:
    """The one-line message of a UserError, also when a DataLoader worker raised it (the
    DataLoader re-raises it with the worker's traceback folded into the message)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1].strip()
    return last.split("UserError: ", 1)[1] if "UserError: " in last else lines[0]


# =============================================================================== flags
def bool_flag(value: str) -> bool:
    """argparse type for on/off flags written like DINO's: --use_fp16 false."""
    lowered = str(value).lower()
    if lowered in {"on", "true", "1", "yes"}:
        return True
    if lowered in {"off", "false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {shown(value)}")


def _number(value: Any, kind: Callable, what: str) -> Any:
    try:
        number = kind(str(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {shown(value)}") from None
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


def parse_args_with_config(parser: argparse.ArgumentParser,
                           argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags, taking defaults from `--config FILE.yaml` (keys are flag names).

    Flags given on the command line override the file; an unknown key or a value outside a
    flag's choices is an error. Errors are one line (`error: ...`), without argparse's usage.
    """
    import yaml

    parser.error = _one_line_error  # type: ignore[method-assign]
    if not any("--config" in action.option_strings for action in parser._actions):
        parser.add_argument("--config", type=str, default=None,
                            help="YAML file of flag values (keys are flag names); flags given on "
                                 "the command line override it.")

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            values = read_yaml_mapping(known.config, "config")
        except UserError as error:
            parser.error(str(error))
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"config {known.config} has unknown keys: {', '.join(unknown)}")
        parser.set_defaults(**{key: _config_value(actions[key], value, known.config, parser)
                               for key, value in values.items()})
    return parser.parse_args(argv)


YAML_MAX_NODES = 100_000  # far above any flag file; bounds an alias bomb before it is built


def read_yaml_mapping(path: str | Path, what: str) -> Dict[str, Any]:
    """A YAML file of `name: value` pairs (flag files, OUTPUT_DIR/config.yaml), or a UserError
    naming it: unreadable, not YAML, not a mapping with string keys, or more than
    YAML_MAX_NODES values once its aliases are expanded (counted before anything is built)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            loader = yaml.SafeLoader(handle)
            try:
                node = loader.get_single_node()
                if node is not None:
                    _count_yaml_nodes(node, f"{what} {path}")
                values = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"cannot read {what} {path}: {capped(' '.join(str(error).split()), 300)}") from error
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(f"{what} {path} must be a mapping of flag names to values, got a {type(values).__name__}")
    odd = [key for key in values if not isinstance(key, str)]
    if odd:
        raise UserError(f"{what} {path}: keys must be flag names, got {shown(odd)}")
    return values


def _count_yaml_nodes(root: Any, where: str) -> None:
    import yaml

    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > YAML_MAX_NODES:
            raise UserError(f"{where} expands to more than {YAML_MAX_NODES} values (aliases "
                            f"repeated inside each other?); write the values out")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(part for pair in node.value for part in pair)


def _config_value(action: argparse.Action, value: Any, config: str,
                  parser: argparse.ArgumentParser) -> Any:
    """A config file's value for one flag, checked like the command line checks it: the
    flag's number of values, its type (the same argparse type function) and its choices."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    where = f"config {config}: {action.dest}"
    if value is None:  # `key:` or `key: null`: the flag's own default, as if the key were absent
        return action.default
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            parser.error(f"{where}: {flag} is a switch, give true or false, got {shown(value)}")
        return value
    if isinstance(value, dict):
        parser.error(f"{where}: expects {'values' if action.nargs else 'one value'}, got a mapping")
    if action.nargs in (None, "?"):
        if isinstance(value, list):
            parser.error(f"{where}: {flag} takes one value, got the list {shown(value)}")
        items = [value]
    else:
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            parser.error(f"{where}: {flag} takes {action.nargs} values, e.g. [a, b], got {shown(value)}")
    converted = []
    for item in items:
        if action.type is not None:
            try:
                if isinstance(item, (list, dict)):
                    raise TypeError(f"expects a plain value, got {shown(item)}")
                item = action.type(item if isinstance(item, str) else str(item))
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                parser.error(f"{where}: {error}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"{where}: invalid choice {shown(item)} "
                         f"(choose from {', '.join(map(str, action.choices))})")
        converted.append(item)
    return converted[0] if action.nargs in (None, "?") else converted


def _one_line_error(message: str) -> None:
    print(f"error: {capped(message)} (see --help)", file=sys.stderr)
    sys.exit(2)


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
    use_cuda = resolve_use_cuda(requested)
    args.gpu = choose_gpu(local_rank, local_world, own_gpu_per_task=_in_srun_step(env)
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
        watch_for_failures(args.rank, args.world_size)
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


def choose_gpu(local_rank: int, local_world: int, own_gpu_per_task: bool = False) -> int:
    """This process's GPU: its local rank among the visible GPUs. More local processes than
    visible GPUs would put two ranks on one GPU: an error on every rank. Under srun a single
    visible GPU per task means per-task binding (--gpus-per-task): GPU 0 (own_gpu_per_task);
    torchrun's processes all see the same GPUs."""
    count = torch.cuda.device_count()
    if own_gpu_per_task and count == 1:
        return 0
    if local_world > count or local_rank >= count:
        raise UserError(f"{local_world} processes on this node but only {count} visible GPU(s): "
                        f"two ranks would share a GPU; start at most {count} processes per node "
                        f"(torchrun --nproc_per_node, srun --ntasks-per-node) or use --device cpu")
    return local_rank


def gpus_expected(env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Why this process should have GPUs (visible devices, NVIDIA device files, a launcher
    that asked for GPUs), or None. CUDA_VISIBLE_DEVICES set to "" or -1 hides them on purpose."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        visible = env["CUDA_VISIBLE_DEVICES"].strip()
        return None if visible in ("", "-1", "none", "NoDevFiles") else f"CUDA_VISIBLE_DEVICES={visible}"
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_TASK",
                 "SLURM_GPUS_PER_NODE", "SLURM_GPUS"):
        if env.get(name, "").strip() not in ("", "0"):
            return f"{name}={env[name]}"
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl"):
        return "NVIDIA device files in /dev"
    return None


def arch_supported(capability: Tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a torch build with these CUDA architectures runs on a GPU of this capability:
    a cubin sm_XY runs on the same major with minor >= Y; PTX (compute_XY) on any newer GPU.
    Architecture-specific targets (sm_90a) run only on their own GPU."""
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        specific = number.endswith(("a", "f"))
        digits = number.rstrip("af")
        if not digits.isdigit():
            continue
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if kind == "compute" and (arch_major, arch_minor) <= capability:
            return True
        if kind == "sm" and arch_major == major and (
                arch_minor == minor if specific else arch_minor <= minor):
            return True
    return False


GPU_INSTALL_HINT = ("install a torch build for this GPU and driver (a build for an older CUDA, "
                    "e.g. pip install torch --index-url https://download.pytorch.org/whl/cu126, "
                    "runs on older drivers and GPUs; see https://pytorch.org/get-started/locally/), "
                    "or pass --device cpu")


def _nvidia_smi_gpus() -> str:
    """The GPUs nvidia-smi sees (name, capability, driver), for error messages."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi not available"
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        return f"nvidia-smi failed: {(out.stderr or out.stdout).strip().splitlines()[:1]}"
    first = lines[0].split(", ")
    if len(first) == 3:
        return f"{first[0]} (capability {first[1]}, driver {first[2]}) x{len(lines)}"
    return lines[0]


DEVICE_CHOICES = ("auto", "cuda", "cpu")


def resolve_use_cuda(requested: str = "auto") -> bool:
    """--device auto|cuda|cpu -> whether to run on CUDA. A GPU that cannot be used where one
    is expected is an error naming it, never a silent run on the CPU."""
    if requested not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device must be auto, cuda or cpu, got {requested!r}")
    if requested == "cpu":
        return False
    build = f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
    if not torch.cuda.is_available():
        reason = gpus_expected()
        if requested == "auto" and reason is None:
            return False
        seen = f"GPUs are expected ({reason}) but" if reason else "--device cuda, but"
        raise UserError(f"{seen} {build} cannot use CUDA; GPUs: {_nvidia_smi_gpus()}; "
                        f"{'a CUDA 13 build needs driver R580+ and sm_75 or newer; ' if torch.version.cuda else ''}"
                        f"{GPU_INSTALL_HINT}")
    check_gpu_arch(build)
    return True


def check_gpu_arch(build: str) -> None:
    """Every visible GPU must be one this torch build has kernels for."""
    arch_list = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        capability = tuple(torch.cuda.get_device_capability(index))
        if arch_list and not arch_supported(capability, arch_list):
            name = torch.cuda.get_device_name(index)
            raise UserError(f"GPU {index} {name} (capability {capability[0]}.{capability[1]}) is "
                            f"not supported by {build}, built for {' '.join(arch_list)}; "
                            f"{GPU_INSTALL_HINT}")


def amp_dtype(device: torch.device) -> torch.dtype:
    """Autocast dtype on a CUDA GPU: bf16 on compute capability 8.0+ (Ampere and newer, native
    bf16 and flash attention), else fp16 with loss scaling as in DINO. (torch reports bf16
    as supported on V100/T4 too, but emulated.)"""
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def _cpuinfo_field(*names: str) -> str:
    """The first /proc/cpuinfo line starting with one of `names`, after its colon ("" elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((l for l in text.splitlines() if l.startswith(names)), "")
    return line.partition(":")[2].strip()


def cpu_flags() -> set:
    """The CPU's feature flags (/proc/cpuinfo's `flags`, or `Features` on ARM); empty elsewhere."""
    return set(_cpuinfo_field("flags", "Features").split())


def cpu_name() -> str:
    """The CPU's model name for run records and benchmark tables (platform.processor() is
    empty on most Linux machines, and platform.machine() only says x86_64)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512/AMX, ARM (FEAT_BF16)


def cpu_bf16_shortfall() -> Optional[str]:
    """None when the CPU computes in bf16 natively; else what it has instead, for a warning.
    Without native bf16 torch emulates it, far slower than fp32 (BENCHMARKS.md)."""
    flags = cpu_flags()
    if any(flag in flags for flag in NATIVE_BF16_FLAGS):
        return None
    return (f"this CPU has no native bf16 (torch's CPU capability: "
            f"{torch.backends.cpu.get_cpu_capability()}; none of the cpuinfo flags "
            f"{', '.join(NATIVE_BF16_FLAGS)})")


def enable_fast_fp32(device: torch.device) -> None:
    """DINO's CUDA speed settings for fp32 network passes: TF32 matrix products and
    convolutions, cudnn autotuning (fixed crop sizes). Not for exact fp32 k-NN similarities:
    eval_knn never calls it."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """TF32 for fp32 matrix products (cuBLAS) and convolutions (cudnn) on (allowed) or off
    inside, the caller's settings restored after, exception or not. Off: exact fp32, for the
    k-NN evaluations during training (knn_monitor), which must equal eval_knn.py's on the same
    checkpoint while training itself runs in TF32 (enable_fast_fp32). No effect on the CPU.

    The two flags are torch's long-standing ones (the matmul flag is what
    torch.set_float32_matmul_precision("highest"/"high") sets for CUDA). The global precision
    is neither read nor set: torch 2.9+ refuses to read it once per-backend settings differ,
    and setting it would also switch oneDNN's CPU matmuls."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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
    raise UserError(f"cannot find the first node of {nodes!r} without scontrol; set MASTER_ADDR "
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


def min_max_over_ranks(value: float) -> Tuple[float, float]:
    """The smallest and the largest `value` over all ranks (one all-reduce), for checks that
    every rank must pass or fail together; (value, value) when not distributed."""
    if not is_dist_avail_and_initialized():
        return value, value
    both = torch.tensor([value, -value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    return float(both[0]), -float(both[1])


def stop_together(error: Optional[UserError]) -> None:
    """Raise `error` on the rank that met it and a UserError on every other rank, so that a
    check made by one rank (e.g. rank 0's output folder) stops the whole run, not only that
    rank while the others wait for it."""
    _, failed = min_max_over_ranks(float(error is not None))
    if error is not None:
        raise error
    if failed:
        raise UserError("another process stopped at set-up (its error is printed above)")


def result_from_main(compute: Callable[[], Any]) -> Any:
    """compute() on rank 0 only, and its (picklable) result on every rank. The other ranks wait
    on the store, not in a collective, so that no collective timeout (30 min) ends a long
    computation (eval_knn --select_slots on ImageNet); if rank 0 fails, FailureWatch ends them."""
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
    out of this process (an error, a CUDA out-of-memory error, Ctrl-C, a non-zero sys.exit),
    the other ranks are told first (FailureWatch), and the process is ended FAILED_EXIT_SECONDS
    later if leaving the group or exiting hangs (NCCL's teardown can, while a peer is stuck)."""
    global _failure_watch
    error = sys.exc_info()[1]
    watch, _failure_watch = _failure_watch, None
    if watch is not None:
        if _is_failure(error):
            watch.announce(_describe_failure(error))
            _exit_after(FAILED_EXIT_SECONDS, f"rank {watch.rank} did not exit within {FAILED_EXIT_SECONDS} s "
                                             f"of its failure; ending it")
        watch.stop()
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


# ================================================================ one failing rank ends all
# Collectives wait up to init_process_group's timeout (30 min) for a rank that never comes: NCCL
# does not notice that a peer process died (gloo does, from the closed socket), and only some
# launchers stop the others (torchrun's agent does; srun without --kill-on-bad-exit does not).
FAILURE_KEY = "sparo_dino/failure"         # the first failing rank's one-line description
FAILURE_COUNT_KEY = "sparo_dino/failures"  # how many ranks failed (the first one writes)
FAILURE_SEEN_KEY = "sparo_dino/seen"       # how many ranks saw it (before they exit)
FAILURE_POLL_SECONDS = 2.0
FAILED_EXIT_SECONDS = 10  # a failing rank's own exit takes well under a second

_failure_watch: Optional["FailureWatch"] = None


class FailureWatch:
    """Ends this process seconds after another rank of the group failed.

    A rank on its way out with an exception writes one line about it to the group's key-value
    store (announce(), from cleanup_distributed); every rank polls the store from a daemon
    thread every FAILURE_POLL_SECONDS and, on finding it, prints that line on stderr and exits
    with status 1, wherever its main thread waits (a collective, a barrier, a data loader). The
    store is the rendezvous one (torchrun's agent or rank 0's process), reached over TCP without
    any collective; polling it costs one small request per rank and poll.
    """

    def __init__(self, store: Any, rank: int, world_size: int,
                 poll_seconds: float = FAILURE_POLL_SECONDS) -> None:
        self.store, self.rank, self.world_size, self.poll_seconds = store, rank, world_size, poll_seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="sparo-failure-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_seconds):
            try:
                if not self.store.check([FAILURE_KEY]):
                    continue
                message = self.store.get(FAILURE_KEY).decode(errors="replace")
                self.store.add(FAILURE_SEEN_KEY, 1)
            except Exception:  # the store has gone (its host process ended): nothing left to watch
                return
            if not self.stopped.is_set():  # this rank is not failing itself
                sys.stderr.write(f"error: {message}; rank {self.rank} stops too\n")
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(1)

    def announce(self, description: str) -> None:
        """Tell every rank that this one fails. The store's host (rank 0's process, unless
        torchrun's agent holds it) then waits, three polls at most, until the others have seen
        it: the store ends with its process."""
        self.stopped.set()
        try:
            if self.store.add(FAILURE_COUNT_KEY, 1) == 1:  # the first failure is the cause
                self.store.set(FAILURE_KEY, f"rank {self.rank} failed: {description}")
            hosts_store = self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
            deadline = time.monotonic() + 3 * self.poll_seconds
            while (hosts_store and self.store.add(FAILURE_SEEN_KEY, 0) < self.world_size - 1
                   and time.monotonic() < deadline):
                time.sleep(0.1)
        except Exception:  # no store left to tell: the others see the closed connections
            pass

    def stop(self) -> None:
        self.stopped.set()


def watch_for_failures(rank: int, world_size: int) -> None:
    """Start this process's FailureWatch on the default group's store (once per group)."""
    global _failure_watch
    if _failure_watch is None and dist.is_initialized():
        _failure_watch = FailureWatch(dist.distributed_c10d._get_default_store(), rank, world_size)


def _is_failure(error: Optional[BaseException]) -> bool:
    if isinstance(error, SystemExit):
        return error.code not in (0, None)
    return error is not None


def _describe_failure(error: BaseException) -> str:
    """One line: a UserError's message, else the exception's type and first line."""
    if isinstance(error, SystemExit) and error.__context__ is not None:  # sys.exit() in an except
        error = error.__context__
    if isinstance(error, UserError):
        return user_error_message(error)
    if isinstance(error, SystemExit):
        return f"exit status {error.code}"
    first_line = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first_line[:300]}" if first_line else type(error).__name__


def _exit_after(seconds: float, message: str) -> None:
    """End the process `seconds` from now unless it has ended by then (a daemon timer)."""
    def end() -> None:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()


def fix_random_seeds(seed: int = 31) -> None:
    """Seed torch, numpy and random (each rank passes its own seed)."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# =========================================================================== schedules
MAX_SCHEDULE_STEPS = 200_000_000  # 1.5 GiB per schedule table: far above any real run


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """One value per iteration: linear warm-up, then a cosine from base_value to final_value."""
    if epochs * niter_per_ep > MAX_SCHEDULE_STEPS:
        raise UserError(f"{epochs} epochs of {niter_per_ep} iterations are more than {MAX_SCHEDULE_STEPS} "
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
    raise UserError(f"unknown optimizer {name!r}: choose adamw or sgd")


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
def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, verify, fsync, rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn file; the
    temporary file is read back (memory-mapped, so cheaply) before it replaces anything.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # a full disk: torch says `unexpected pos`
        raise UserError(write_error(path, error)) from error
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file through a temporary file and a rename: never a torn file; a
    full disk is a UserError naming the file, which keeps its previous content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as error:
        raise UserError(write_error(path, error)) from error
    finally:
        if tmp.exists():
            tmp.unlink()


def write_error(path: Path, error: BaseException) -> str:
    """One line for a file that could not be written (full disk, read-only folder, ...)."""
    reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:200]
    kept = " (its previous version is kept)" if path.exists() else ""
    return f"cannot write {path}: {reason}{kept}; free space or choose a writable folder"


def remove_stale_temporary_files(folder: Path) -> None:
    """Delete temporary files that a process killed during atomic_save left behind."""
    for stale in Path(folder).glob(".*.tmp.*"):
        stale.unlink(missing_ok=True)


def save_on_master(obj: Any, path: str | Path) -> None:
    if is_main_process():
        atomic_save(obj, path)


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Safe load (weights_only=True) with clear errors for missing, torn or foreign files.

    Official DINO checkpoints pickle an argparse.Namespace under `args`: that one class is
    allowed explicitly, nothing else.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means an unusable file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise UserError(f"checkpoint {path} is not a plain checkpoint and was refused by "
                            f"safe loading: {first_line}") from error
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a torch "
                        f"checkpoint): {first_line}") from error
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


SAFETENSORS_METADATA_KEY = "sparo_dino"  # the header entry of export.py's files with their config.json
EXPORT_CONFIG_NAME = "config.json"  # written beside them


def read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(tensors, model_config or None) of a .safetensors file; no code is run."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    state = load_safetensors_file(str(path), device="cpu")
    meta = metadata.get(SAFETENSORS_METADATA_KEY)
    return state, json.loads(meta).get("model_config") if meta else None


def config_json_mismatch(path: Path, model_config: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why the config.json beside an exported weight file does not describe it, or None: an
    export killed between its renames (or files copied from two exports) leaves a pair that
    would otherwise load without a word."""
    sibling = path.with_name(EXPORT_CONFIG_NAME)
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


def _load_safetensors(path: Path) -> Dict[str, Any]:
    """An exported backbone (export.py): its tensors plus `model_config` from the header."""
    try:
        state, config = read_safetensors(path)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"checkpoint {path} cannot be read as safetensors: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from error
    mismatch = config_json_mismatch(path, config)
    if mismatch:
        raise UserError(mismatch)
    return {**state, "model_config": config} if config else state


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
        if not is_dist_avail_and_initialized():
            return
        totals = torch.tensor([self.count, self.total], dtype=torch.float64,
                              device=collective_device())
        dist.all_reduce(totals)
        self.count, self.total = int(totals[0].item()), float(totals[1].item())

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
                max_mem = peak_memory_mib()
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


def peak_memory_mib() -> float:
    """Peak memory so far in MiB: CUDA's allocator peak on a GPU (DINO's `max mem`), else the
    peak resident set of this process (getrusage's ru_maxrss, KiB on Linux)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


Sized = Any  # an iterable with len(); kept loose for DataLoaders


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of a CUDA device, or the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def ensure_output_dir(path: str | Path, flag: str) -> Path:
    """Create an output folder before any long work, so that a path that cannot be written
    fails in the first second with one line instead of after hours of computation."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {flag} {folder}: {error.strerror}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not writable")
    return folder


def ensure_output_file(path: str | Path, flag: str) -> Path:
    """The folder of an output file (--output_json), checked like ensure_output_dir."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{flag} {file} is a folder, not a file")
    ensure_output_dir(file.parent, f"the folder of {flag}")
    return file


LOCK_NAME = "training.lock"
LOCK_WAIT_S = 15.0  # a requeued job may start while its pre-empted predecessor is exiting
_held_locks: Dict[str, Any] = {}  # resolved folder -> open lock file, for this process


def lock_output_dir(folder: str | Path, holder_name: str = "a training run") -> None:
    """Hold an exclusive lock on an output folder for the life of this process, so that two
    runs never write into one folder; a folder held by another process is an error naming it.

    Rank 0 takes it (call it on rank 0 only): the other ranks of a run write nothing there,
    and ranks on other nodes would lock themselves out of a shared folder. flock locks die
    with their process, so a crashed run's lock is never stale. release_output_locks()
    removes the file; after a kill -9 it stays, holding the dead process's id, and is reused.
    """
    import fcntl

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held_locks:
        return
    path = folder / LOCK_NAME
    deadline = time.time() + LOCK_WAIT_S
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if time.time() < deadline:
                time.sleep(0.5)
                continue
            raise UserError(f"--output_dir {folder} is in use by {holder} ({path}); wait for "
                            f"that run to end or choose another --output_dir") from None
        # The holder may have removed the file between our open and our lock: then this lock
        # is on a deleted file and means nothing; take the new file's lock instead.
        if os.path.exists(path) and os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder_name}, pid {os.getpid()} on {socket.gethostname()}, "
                 f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held_locks[key] = handle


def release_output_locks() -> None:
    """Remove and release the output folder locks this process holds."""
    while _held_locks:
        _, handle = _held_locks.popitem()
        try:
            os.unlink(handle.name)
        except OSError:
            pass
        handle.close()


def write_json_line(path: str | Path, record: Dict[str, Any]) -> None:
    """Append one JSON record (one line) to a log file; a full disk is a UserError."""
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        raise UserError(write_error(Path(path), error)) from error


# ===================================================================== loading weights
def checkpoint_backbone(checkpoint: Dict[str, Any], checkpoint_key: str, what: str,
                        key_flag: str = "--checkpoint_key") -> Tuple[Dict[str, Any], str]:
    """(backbone state dict as stored, what it is) of a loaded file: the `checkpoint_key`
    weights of a training checkpoint, or a bare backbone (DINO's released files, export.py's)."""
    if isinstance(checkpoint.get(checkpoint_key), dict):
        return checkpoint[checkpoint_key], f"'{checkpoint_key}' weights"
    if all(isinstance(v, torch.Tensor) for k, v in checkpoint.items() if k != "model_config"):
        return {k: v for k, v in checkpoint.items() if k != "model_config"}, "backbone weights"
    keys = [k for k, v in checkpoint.items() if isinstance(v, dict)]
    raise UserError(f"{what} has no '{checkpoint_key}' weights (it holds: "
                    f"{', '.join(keys) or 'no state dicts'}); see {key_flag}")


def checkpoint_config(checkpoint: Dict[str, Any], state: Dict[str, torch.Tensor],
                      what: str = "the weight file") -> vits.BackboneConfig:
    """The BackboneConfig a file carries as `model_config`, else the one its backbone weights'
    shapes imply (official DINO files carry none)."""
    stored = checkpoint.get("model_config")
    if stored is None:
        try:
            return vits.BackboneConfig.from_state_dict(state)
        except ValueError as error:
            raise UserError(str(error)) from None
    if not isinstance(stored, dict):
        raise UserError(f"{what}: its model_config is a {type(stored).__name__}, not a mapping")
    try:
        return vits.BackboneConfig.from_dict(stored)
    except ValueError as error:
        raise UserError(f"{what}: its model_config is malformed: {capped(str(error), 300)}") from error


class BackboneWeights(NamedTuple):
    """A backbone read from a weight file."""

    state: Dict[str, torch.Tensor]  # the backbone's tensors under DINO's parameter names
    config: vits.BackboneConfig  # the file's model_config, else the one its shapes imply
    source: str  # what they are: "'teacher' weights" or "backbone weights"
    head: List[str]  # the projection head's tensors stored with the backbone, left out


def backbone_tensors(checkpoint: Dict[str, Any], checkpoint_key: str = "teacher", what: str = "the file",
                     key_flag: str = "--checkpoint_key") -> Tuple[Dict[str, torch.Tensor], List[str], str]:
    """(backbone tensors, projection-head tensors left out, what they are) of a loaded file: its
    `checkpoint_key` weights or its bare backbone, without DDP's `module.` and keeping the
    `backbone.` part of a student/teacher (MultiCropWrapper) state dict."""
    stored, source = checkpoint_backbone(checkpoint, checkpoint_key, what, key_flag)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in stored.items()}
    head: List[str] = []
    if any(k.startswith("backbone.") for k in state):
        head = [k for k in state if k.startswith("head.")]
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state, head, source


def read_backbone(path: str | Path, checkpoint_key: str = "teacher", what: Optional[str] = None,
                  key_flag: str = "--checkpoint_key") -> BackboneWeights:
    """The one reader of weight files: this project's checkpoints (student/teacher +
    model_config), export.py's files, bare backbone state dicts and official DINO files (bare,
    or full checkpoints with `args` as a Namespace). `what` names the file in errors."""
    checkpoint = load_checkpoint(path)
    state, head, source = backbone_tensors(checkpoint, checkpoint_key, what or str(path), key_flag)
    return BackboneWeights(state, checkpoint_config(checkpoint, state, what or str(path)), source, head)


def check_state_fits(state: Dict[str, torch.Tensor], config: vits.BackboneConfig, path: str | Path) -> None:
    """A UserError unless `state` loads strictly into the backbone `config` describes. The model
    is built on the meta device: sizes read from a file are checked before anything is allocated."""
    with torch.device("meta"):
        own = config.build().state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    problems = []
    if wrong_shape:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape]
        problems.append(f"shape mismatch (file vs model): {_short_list(shapes)}")
    missing = [k for k in own if k not in state]
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    if problems:
        raise UserError(f"{path} does not fit a {config.arch} readout={config.readout} backbone; "
                        f"{'; '.join(problems)}")


def load_backbone(pretrained_weights: str, checkpoint_key: str = "teacher",
                  expected: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a backbone and load a file's weights (read_backbone) into it strictly; returns
    (model, model_config dict). `expected` holds configuration values the caller asks for
    (e.g. arch, patch_size from the command line); one that differs from the file is an error,
    never a silent rebuild.
    """
    state, config, source, _ = read_backbone(pretrained_weights, checkpoint_key)
    disagreement = config.disagreement(expected or {})
    if disagreement:
        raise UserError(f"{pretrained_weights} {disagreement}")
    check_state_fits(state, config, pretrained_weights)
    model = config.build()
    model.load_state_dict(state)
    print(f"Loaded {source} from {pretrained_weights}: {config.arch}/{config.patch_size} readout={config.readout}")
    return model, config.to_dict()


def _short_list(keys: List[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
