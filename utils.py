"""Helpers shared by every script: flags and configs, distributed set-up, data sets,
schedules, optimisation, checkpoints, weight loading and progress logging."""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with a non-zero exit."""


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main(); a UserError becomes one clear line and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {user_error_message(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {value!r}")


def _number(value: Any, kind: Callable, what: str) -> Any:
    try:
        number = kind(str(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from None
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
            with open(known.config) as handle:
                values = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as error:
            parser.error(f"cannot read config {known.config}: {error}")
        if not isinstance(values, dict):
            parser.error(f"config {known.config} must be a mapping of flag names to values")
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"config {known.config} has unknown keys: {', '.join(unknown)}")
        parser.set_defaults(**{key: _config_value(actions[key], value, known.config, parser)
                               for key, value in values.items()})
    return parser.parse_args(argv)


def _config_value(action: argparse.Action, value: Any, config: str,
                  parser: argparse.ArgumentParser) -> Any:
    """A config file's value for one flag, checked like the command line checks it: the
    flag's number of values, its type (the same argparse type function) and its choices."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    where = f"config {config}: {action.dest}"
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            parser.error(f"{where}: {flag} is a switch, give true or false, got {value!r}")
        return value
    if isinstance(value, dict):
        parser.error(f"{where}: expects {'values' if action.nargs else 'one value'}, got a mapping")
    if action.nargs in (None, "?"):
        if isinstance(value, list):
            parser.error(f"{where}: {flag} takes one value, got the list {value!r}")
        items = [value]
    else:
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            parser.error(f"{where}: {flag} takes {action.nargs} values, e.g. [a, b], got {value!r}")
    converted = []
    for item in items:
        if action.type is not None:
            try:
                item = action.type(item if isinstance(item, str) else str(item))
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                parser.error(f"{where}: {error}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"{where}: invalid choice {item!r} "
                         f"(choose from {', '.join(map(str, action.choices))})")
        converted.append(item)
    return converted[0] if action.nargs in (None, "?") else converted


def _one_line_error(message: str) -> None:
    print(f"error: {message} (see --help)", file=sys.stderr)
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


def enable_fast_fp32(device: torch.device) -> None:
    """DINO's CUDA speed settings for fp32 network passes: TF32 matrix products and
    convolutions, cudnn autotuning (fixed crop sizes). Not for exact fp32 k-NN similarities:
    eval_knn never calls it."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


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


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the GPU with NCCL, the CPU with gloo."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def stop_together(error: Optional[UserError]) -> None:
    """Raise `error` on the rank that met it and a UserError on every other rank, so that a
    check made by one rank (e.g. rank 0's output folder) stops the whole run, not only that
    rank while the others wait for it. One all-reduce; nothing when not distributed."""
    failed = error is not None
    if is_dist_avail_and_initialized():
        flag = torch.tensor([float(failed)], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = flag.item() > 0
    if error is not None:
        raise error
    if failed:
        raise UserError("another process stopped at set-up (its error is printed above)")


def cleanup_distributed() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def fix_random_seeds(seed: int = 31) -> None:
    """Seed torch, numpy and random (each rank passes its own seed)."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ================================================================================ data
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_INSTALL = ("apt-get install dataset-fashion-mnist (as root), or "
                         "apt-get download dataset-fashion-mnist && dpkg-deb -x "
                         "dataset-fashion-mnist_*.deb DIR and set FASHION_MNIST_DIR="
                         "DIR/usr/share/datasets/fashion-mnist")
BUILTIN_DATASETS = ("fashion_mnist", "digits")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ArrayImageDataset(torch.utils.data.Dataset):
    """Grey uint8 images (N, H, W) with labels, served as PIL images through a transform: RGB,
    or with grey=True single-channel ("L") images for a transform that ends in
    `to_three_channels` (DINO's augmentation then takes 20 % less time)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 transform: Optional[Callable] = None, grey: bool = False) -> None:
        self.images, self.targets, self.transform = images, labels.astype(np.int64), transform
        self.classes = [str(c) for c in sorted(set(self.targets.tolist()))]
        self.grey = grey

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index], mode="L")
        if not self.grey:
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def to_three_channels(image: torch.Tensor) -> torch.Tensor:
    """A (1, H, W) grey image tensor as (3, H, W) RGB; 3-channel tensors pass unchanged."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): big-endian header, then raw uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir() -> Path:
    """The folder holding the Debian package's Fashion-MNIST files."""
    candidates = [os.environ["FASHION_MNIST_DIR"]] if os.environ.get("FASHION_MNIST_DIR") else []
    for folder in map(Path, candidates + list(FASHION_MNIST_DIRS)):
        if (folder / "train-labels-idx1-ubyte.gz").exists() or \
                (folder / "train-labels-idx1-ubyte").exists():
            return folder
    raise UserError(f"Fashion-MNIST is not installed; install it with: {FASHION_MNIST_INSTALL}")


def load_fashion_mnist(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's official train (60k) or test (10k) split as (images, labels)."""
    folder = fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"

    def read(kind: str) -> np.ndarray:
        name = f"{prefix}-{kind}-ubyte"
        path = folder / f"{name}.gz"
        return _read_idx(path if path.exists() else folder / name)

    return read("images-idx3"), read("labels-idx1")


def load_digits_split(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits; test = every 5th image (360), train = the rest (1,437)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise UserError("the digits data set needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels
    is_test = np.arange(len(images)) % 5 == 0
    keep = is_test if split == "test" else ~is_test
    return np.ascontiguousarray(images[keep]), digits.target[keep]


def load_rgb_image(path: str) -> Any:
    """Open any image as 8-bit RGB: grey, palette, RGBA (on black) and 16-bit images included."""
    from PIL import Image

    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
    return to_rgb(image)


def open_image(path: str) -> Any:
    """Open an image without decoding it (the file is read, and closed, at its first load()):
    a JPEG can then be decoded at reduced resolution (augmentations.MultiCropGeometry)."""
    from PIL import Image

    return Image.open(path)


def to_rgb(image: Any) -> Any:
    """A decoded PIL image as 8-bit RGB (see load_rgb_image)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def image_folder(root: str, transform: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None,
                 loader: Callable[[str], Any] = load_rgb_image) -> torch.utils.data.Dataset:
    """The images under `root`, ImageFolder-style: one class per sub-folder (sorted names), or
    one class for a flat folder of images, read by `loader` (8-bit RGB by default).

    class_names: number the classes by this list (the training split's classes) instead of
    by the folder's own sub-folders, so that a val/ holding a subset of the classes gets the
    training labels; a class missing from the list is an error naming it.
    """
    path = Path(root)
    if not path.is_dir():
        raise UserError(f"data folder {root} does not exist (built-in data sets: "
                        f"{', '.join(BUILTIN_DATASETS)})")
    classes = class_folders(path)
    if not classes:
        files = _image_files(path, path, set(), recurse=False)
        if not files:
            raise UserError(f"data folder {root} holds no images (extensions: "
                            f"{' '.join(IMAGE_EXTENSIONS)})")
        return ImageFiles([(f, 0) for f in files], ["images"], transform, loader)
    names = list(class_names) if class_names is not None else classes
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise UserError(f"{root} has classes that the training split lacks: {_short_list(unknown)}; "
                        f"a classifier can only predict training classes")
    seen: set = set()
    samples, empty = [], []
    for name in classes:
        files = _image_files(path / name, path, seen, recurse=True)
        empty += [] if files else [name]
        label = names.index(name)
        samples += [(f, label) for f in files]
    if empty:
        raise UserError(f"data folder {root} holds no images in {_short_list(empty)} (extensions: "
                        f"{' '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(samples, names, transform, loader)


def class_folders(root: Path) -> List[str]:
    """Sorted names of the class sub-folders of root (links to folders included), leaving out
    links back to root or above it (`loop -> ..`), which would count images twice."""
    above = {root.resolve(), *root.resolve().parents}
    return sorted(child.name for child in root.iterdir()
                  if child.is_dir() and child.resolve() not in above)


def _image_files(folder: Path, root: Path, seen: set, recurse: bool) -> List[str]:
    """Image files under folder in ImageFolder's order. Only regular files (or links to them)
    count: a FIFO named x.jpg would block the loader forever. Links are followed, but each
    folder is entered once, links back to root or above are not entered, and each file is
    counted once (`seen` holds real paths across calls), so link loops end and linked
    duplicates are not counted twice. Costs one stat per link and per folder, not per file."""
    above = {str(root.resolve()), *map(str, root.resolve().parents)}
    visited: set = set()
    found: List[Tuple[str, str]] = []

    def walk(current: str) -> None:
        real_dir = os.path.realpath(current)
        if real_dir in visited:
            return
        visited.add(real_dir)
        with os.scandir(current) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        for entry in entries:
            if entry.is_dir():  # follows links
                if recurse and os.path.realpath(entry.path) not in above:
                    walk(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                real = os.path.realpath(entry.path) if entry.is_symlink() \
                    else f"{real_dir}/{entry.name}"
                if real not in seen:
                    seen.add(real)
                    found.append((current, entry.name))

    walk(str(folder))
    return [f"{directory}/{name}" for directory, name in sorted(found)]


class ImageFiles(torch.utils.data.Dataset):
    """Labelled image files (path, label), read by `loader` (8-bit RGB by default); `classes`
    names the labels."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str],
                 transform: Optional[Callable] = None,
                 loader: Callable[[str], Any] = load_rgb_image) -> None:
        self.samples, self.classes, self.transform = samples, classes, transform
        self.loader = loader
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, label = self.samples[index]
        image = self.loader(path)
        return (self.transform(image) if self.transform else image), label


UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL raises on bad files


class SkipUnreadableImages(torch.utils.data.Dataset):
    """Pre-training data that survives bad files: an unreadable or truncated image is skipped
    with a warning naming it (the next readable image is served in its place). A long run
    should not die on one corrupt JPEG; labels are unused, so nothing else changes."""

    max_consecutive_failures = 50

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        self.warned: set = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        for attempt in range(self.max_consecutive_failures):
            position = (index + attempt) % len(self.dataset)
            try:
                return self.dataset[position]
            except UNREADABLE_IMAGE_ERRORS as error:
                self._warn(position, error)
        raise UserError(f"{self.max_consecutive_failures} images in a row are unreadable "
                        f"(from {_sample_path(self.dataset, index)}); check the data folder")

    def _warn(self, position: int, error: Exception) -> None:
        if position not in self.warned:
            self.warned.add(position)
            print(f"Warning: skipping unreadable image {_sample_path(self.dataset, position)} "
                  f"({type(error).__name__}: {error})", file=sys.stderr, flush=True)


class FailOnUnreadableImages(SkipUnreadableImages):
    """Evaluation data: an unreadable image is an error naming the file, because silently
    dropping test images would change the reported accuracy."""

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except UNREADABLE_IMAGE_ERRORS as error:
            raise UserError(f"cannot read image {_sample_path(self.dataset, index)} "
                            f"({type(error).__name__}: {error})") from error


def _sample_path(dataset: Any, index: int) -> str:
    samples = getattr(dataset, "samples", None)
    return samples[index][0] if samples else f"#{index}"


def build_dataset(data_path: str, split: str, transform: Optional[Callable] = None,
                  subset: Optional[int] = None, grey: bool = False,
                  lazy: bool = False) -> torch.utils.data.Dataset:
    """A labelled image data set by built-in name or folder.

    split: "pretrain" (a whole ImageFolder, or the built-in train split), "train" or "test"
    (built-in splits, or the folder's train/ and val/ sub-folders, DINO's layout).
    subset: keep N images; of a folder, N class-balanced ones (balanced_indices), because a
    folder lists its images class by class; of a built-in set (stored shuffled), the first N,
    so that bench/quality.py's held-out images (training images 50000 on) stay unseen.
    grey: serve the built-in (grey) data sets as single-channel images; the transform must
    then make them 3-channel (to_three_channels). Folders are always read as RGB.
    lazy: pre-training folders give the transform undecoded images (open_image); the transform
    decodes them and converts them to RGB (augmentations.MultiCropGeometry).
    """
    split_name = "train" if split in ("pretrain", "train") else "test"
    if data_path == "fashion_mnist":
        dataset: torch.utils.data.Dataset = ArrayImageDataset(*load_fashion_mnist(split_name),
                                                              transform, grey)
    elif data_path == "digits":
        dataset = ArrayImageDataset(*load_digits_split(split_name), transform, grey)
    elif split == "pretrain":
        loader = open_image if lazy else load_rgb_image
        dataset = SkipUnreadableImages(image_folder(data_path, transform, loader=loader))
    else:
        if not Path(data_path).is_dir():
            image_folder(data_path)  # raises the "does not exist" error with the built-in names
        folder = Path(data_path) / ("train" if split_name == "train" else "val")
        if not folder.is_dir():
            raise UserError(f"{data_path} needs a {folder.name}/ sub-folder (DINO's layout: "
                            f"DATA/train/CLASS/IMG, DATA/val/CLASS/IMG)")
        # val/ is numbered by train/'s class names: a val/ with a subset of the classes
        # keeps the training labels (each split numbering its own classes shifts them).
        train_classes = class_folders(folder.parent / "train") if split_name == "test" \
            and (folder.parent / "train").is_dir() else []
        dataset = FailOnUnreadableImages(image_folder(str(folder), transform, train_classes or None))
    if subset is not None and 0 < subset < len(dataset):
        builtin = data_path in ("fashion_mnist", "digits")
        indices = range(subset) if builtin else balanced_indices(dataset_labels(dataset), subset)
        dataset = torch.utils.data.Subset(dataset, indices)
    if len(dataset) == 0:
        raise UserError(f"data set {data_path} ({split}) is empty")
    return dataset


def balanced_indices(labels: np.ndarray, count: int) -> List[int]:
    """`count` indices taken round-robin over the classes: every class's i-th image (in data
    set order) before any class's (i+1)-th, classes in label order; a class that runs out
    is passed over. Returned in data set order, deterministic."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    group_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    position = np.empty(len(labels), dtype=np.int64)
    position[order] = np.arange(len(labels)) - group_start  # rank of each image within its class
    chosen = np.lexsort((labels, position))[:count]  # by position, then label
    return sorted(int(i) for i in chosen)


def dataset_labels(dataset: torch.utils.data.Dataset) -> np.ndarray:
    """The integer labels of a data set built by build_dataset, without loading images."""
    if isinstance(dataset, torch.utils.data.Subset):
        return np.asarray(dataset_labels(dataset.dataset))[list(dataset.indices)]
    if isinstance(dataset, SkipUnreadableImages):
        return dataset_labels(dataset.dataset)
    return np.asarray(dataset.targets, dtype=np.int64)


# =========================================================================== schedules
def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """One value per iteration: linear warm-up, then a cosine from base_value to final_value."""
    warmup_iters = min(warmup_epochs * niter_per_ep, epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * steps / max(len(steps), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# ======================================================================== optimisation
def get_params_groups(model: nn.Module) -> List[Dict[str, Any]]:
    """DINO's two groups: biases and 1-D parameters (norms) get no weight decay."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (LARS), skipping 1-D parameters like DINO."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim != 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm,
                                        torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                mu = state["mu"].mul_(group["momentum"]).add_(update)
                param.add_(mu, alpha=-group["lr"])


def build_optimizer(name: str, params_groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    """adamw (fused kernel, else foreach), sgd or lars; lr and wd are set per iteration."""
    if name == "adamw":
        try:  # one fused kernel for all parameters (CPU and CUDA since torch 2.4)
            return torch.optim.AdamW(params_groups, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(params_groups, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9, foreach=True)
    if name == "lars":
        return LARS(params_groups)
    raise UserError(f"unknown optimizer {name!r}: choose adamw, sgd or lars")


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's per-parameter clipping: each gradient's norm is capped at `clip` on its own."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    factors = [torch.clamp(clip / (norm + 1e-6), max=1.0) for norm in norms]
    torch._foreach_mul_(grads, factors)


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


def _load_safetensors(path: Path) -> Dict[str, Any]:
    """An exported backbone (export.py): its tensors plus `model_config` from the header."""
    import portable

    try:
        state, config = portable.read_safetensors(path)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"checkpoint {path} cannot be read as safetensors: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from error
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


def lock_output_dir(folder: str | Path) -> None:
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
    handle.write(f"a training run, pid {os.getpid()} on {socket.gethostname()}, "
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
    """Append one JSON record (one line) to a log file."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


# ===================================================================== loading weights
def _strip_prefixes(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Backbone weights out of a DINO-style state dict: drop DDP's `module.` and keep the
    `backbone.` part of a student/teacher (MultiCropWrapper) state dict when there is one."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def infer_model_config(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Rebuild a model configuration from a backbone state dict's shapes (e.g. official DINO
    files, which carry no configuration)."""
    import vision_transformer as vits

    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise UserError("the weights are not a ViT backbone (no patch_embed.proj.weight/pos_embed)")
    embed_dim, _, patch_size, _ = state["patch_embed.proj.weight"].shape
    arch = next((name for name, (width, _, _) in vits.ARCHS.items() if width == embed_dim), None)
    if arch is None:
        raise UserError(f"no known architecture has width {embed_dim} ({sorted(vits.ARCHS)})")
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    config: Dict[str, Any] = dict(arch=arch, patch_size=int(patch_size), img_size=int(grid * patch_size),
                                  readout="sparo" if "sparo.queries" in state else "cls")
    if config["readout"] == "sparo":
        slots, attn_dim = state["sparo.queries"].shape
        depth = vits.ARCHS[arch][1]
        num_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        config.update(sparo_slots=int(slots), sparo_attn_dim=int(attn_dim),
                      sparo_dim=int(state["sparo.out_proj.weight"].shape[0]),
                      sparo_share_kv="sparo.value.weight" not in state,
                      sparo_keep_all_blocks=num_blocks == depth)
    return config


def load_backbone(pretrained_weights: str, checkpoint_key: str = "teacher",
                  expected: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a backbone and load weights into it strictly; returns (model, model_config).

    Accepts this project's checkpoints (student/teacher + model_config), bare backbone state
    dicts and official DINO files (bare, or full checkpoints with `args` as a Namespace).
    `expected` holds configuration values the caller asks for (e.g. arch, patch_size from the
    command line); one that differs from the checkpoint is an error, never a silent rebuild.
    """
    import vision_transformer as vits

    checkpoint = load_checkpoint(pretrained_weights)
    if checkpoint_key in checkpoint and isinstance(checkpoint[checkpoint_key], dict):
        state, source = checkpoint[checkpoint_key], f"'{checkpoint_key}' weights"
    elif all(isinstance(v, torch.Tensor) for k, v in checkpoint.items() if k != "model_config"):
        # a bare backbone: DINO's released files, or export.py's (with model_config)
        state = {k: v for k, v in checkpoint.items() if k != "model_config"}
        source = "backbone weights"
    else:
        keys = [k for k, v in checkpoint.items() if isinstance(v, dict)]
        raise UserError(f"{pretrained_weights} has no '{checkpoint_key}' weights "
                        f"(it holds: {', '.join(keys) or 'no state dicts'}); see --checkpoint_key")
    state = _strip_prefixes(state)
    config = dict(checkpoint["model_config"]) if isinstance(checkpoint.get("model_config"), dict) \
        else infer_model_config(state)
    for key, value in (expected or {}).items():
        if value is not None and key in config and config[key] != value:
            raise UserError(f"{pretrained_weights} holds a model with {key}={config[key]!r}, but "
                            f"{key}={value!r} was asked for")
    model = vits.build_backbone(config)
    own = model.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in wrong_shape},
                                   strict=False)
    problems = []
    if wrong_shape:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape]
        problems.append(f"shape mismatch (file vs model): {_short_list(shapes)}")
    missing = [k for k in result.missing_keys if k not in wrong_shape]
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys: {_short_list(result.unexpected_keys)}")
    if problems:
        raise UserError(f"{pretrained_weights} does not fit a {config['arch']} "
                        f"readout={config['readout']} backbone; {'; '.join(problems)}")
    print(f"Loaded {source} from {pretrained_weights}: {config['arch']}/{config['patch_size']} readout={config['readout']}")
    return model, config


def _short_list(keys: List[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ============================================== evaluation: weights, data and features
# Shared by eval_knn.py, eval_linear.py and any script that evaluates a frozen backbone.
def add_eval_args(parser: argparse.ArgumentParser, batch_size: int = 128) -> None:
    """The flags every evaluation script shares, with DINO's names and defaults."""
    import vision_transformer as vits

    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Checkpoint to evaluate: this project's checkpoint.pth, a bare "
                             "backbone state dict, or an official DINO file (CLS read-out).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help="Which weights of a checkpoint to use: teacher (DINO's choice) or student.")
    parser.add_argument("--arch", default=None, type=str, choices=sorted(vits.ARCHS),
                        help="Expected architecture; read from the checkpoint, so only needed as "
                             "a check (a mismatch is an error).")
    parser.add_argument("--patch_size", default=None, type=positive_int,
                        help="Expected patch size; read from the checkpoint (a mismatch is an error).")
    parser.add_argument("--readout", default=None, type=str, choices=vits.READOUTS,
                        help="Expected read-out (sparo or cls); read from the checkpoint (a "
                             "mismatch is an error).")
    parser.add_argument("--img_size", default=None, type=positive_int,
                        help="Side of the centre crop fed to the network (default: the image size "
                             "the checkpoint was trained at, e.g. 224 or 28).")
    parser.add_argument("--resize_size", default=None, type=positive_int,
                        help="Short side the images are resized to before the centre crop "
                             "(default: img_size * 256 / 224, DINO's 256 for 224).")
    parser.add_argument("--data_path", default="fashion_mnist", type=str,
                        help="A folder with train/ and val/ ImageFolders (DINO's layout), or a "
                             "built-in data set: fashion_mnist (official 60k/10k split) or digits "
                             "(scikit-learn; test = every 5th image).")
    parser.add_argument("--train_subset", default=None, type=non_negative_int,
                        help="Use only N training images (class-balanced in a folder; the k-NN bank, the linear "
                             "probe's training set), for quick evaluations. Default: all.")
    parser.add_argument("--test_subset", default=None, type=non_negative_int,
                        help="Use only N test images (class-balanced in a folder). Results on a subset are not the "
                             "official test figures; leave unset to report. Default: all.")
    parser.add_argument("--batch_size_per_gpu", default=batch_size, type=positive_int,
                        help="Images per process (per GPU, or per CPU process).")
    parser.add_argument("--num_workers", default=None, type=non_negative_int,
                        help="Data-loading processes per GPU/process (default: 10 on GPU as in "
                             "DINO; on CPU a number that leaves the cores to the network).")
    parser.add_argument("--use_fp16", default=False, type=bool_flag,
                        help="Extract features under autocast on CUDA (bf16 where supported, else "
                             "fp16): faster, slightly less exact. Ignored on CPU.")
    parser.add_argument("--slots", default=None, type=str,
                        help="SPARO only: evaluate on a subset of slots, e.g. 0,5,9 (the kept slots "
                             "are rescaled to keep unit norm).")
    parser.add_argument("--output_json", default=None, type=str,
                        help="Also write every result to this JSON file.")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="URL to set up distributed evaluation (torchrun and Slurm set the environment).")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="auto: CUDA when usable; an error when GPUs are visible but CUDA "
                             "cannot use them. cuda: require a GPU. cpu: never use a GPU.")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Ignored; torchrun sets LOCAL_RANK.")


def default_num_workers(device: torch.device) -> int:
    """DINO's 10 loaders per GPU; on CPU the network needs the cores, so few or none."""
    if device.type == "cuda":
        return 10
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores // (4 * get_world_size()))


def load_eval_backbone(args: argparse.Namespace) -> Tuple[nn.Module, Dict[str, Any]]:
    """The frozen backbone named by --pretrained_weights, checked against --arch/--patch_size,
    on args.device in eval mode with gradients off."""
    if not args.pretrained_weights:
        raise UserError("--pretrained_weights is required (no weights are downloaded)")
    model, config = load_backbone(args.pretrained_weights, args.checkpoint_key,
                                  expected=dict(arch=args.arch, patch_size=args.patch_size,
                                                readout=getattr(args, "readout", None)))
    model.to(args.device).eval()
    for param in model.parameters():
        param.requires_grad = False
    return model, config


def eval_crop_size(args: argparse.Namespace, config: Dict[str, Any]) -> int:
    """--img_size, else the checkpoint's training resolution; must be a multiple of the patch."""
    size = args.img_size or int(config.get("img_size", 224))
    if size < 1 or size % config["patch_size"]:
        raise UserError(f"image size {size} is not a positive multiple of the patch size "
                        f"{config['patch_size']}; choose --img_size accordingly")
    return size


def eval_transform(crop_size: int, resize_size: Optional[int] = None) -> Callable:
    """DINO's evaluation pre-processing: bicubic resize of the short side (default
    crop_size * 256 / 224), centre crop, ImageNet normalisation."""
    from torchvision import transforms as T

    resize = resize_size or int(round(crop_size * 256 / 224))
    if resize < crop_size:
        raise UserError(f"--resize_size {resize} is smaller than the crop size {crop_size}")
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(crop_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def parse_slots(text: Optional[str], config: Dict[str, Any]) -> Optional[List[int]]:
    """--slots "0,5,9" -> [0, 5, 9], checked against the checkpoint's read-out and L."""
    if text is None or str(text).strip() == "":
        return None
    require_sparo(config, "--slots")
    try:
        slots = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as error:
        raise UserError(f"--slots takes comma-separated slot numbers like 0,5,9, got {text!r}") from error
    num_slots = int(config["sparo_slots"])
    bad = [s for s in slots if not 0 <= s < num_slots]
    if not slots or bad:
        raise UserError(f"--slots must name slots between 0 and {num_slots - 1}, got {text!r}")
    if len(set(slots)) != len(slots):
        raise UserError(f"--slots names a slot twice: {text!r}")
    return slots


def require_sparo(config: Dict[str, Any], flag: str) -> None:
    if config.get("readout") != "sparo":
        raise UserError(f"{flag} needs a SPARO checkpoint; this one has readout="
                        f"{config.get('readout')!r}, which has no slots")


def require_slot_count(count: Optional[int], config: Dict[str, Any], flag: str) -> None:
    """A number of slots asked for (--top_k, --select_slots) must exist in this checkpoint."""
    if count is None:
        return
    require_sparo(config, flag)
    if count > int(config["sparo_slots"]):
        raise UserError(f"{flag} {count} exceeds the {config['sparo_slots']} slots of this checkpoint")


def feature_autocast(device: torch.device, enabled: bool) -> Any:
    """Autocast for frozen-feature extraction on CUDA (bf16 on capability 8.0+, else fp16)."""
    import contextlib

    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype(device))


def all_gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """all_gather of same-shaped tensors -> (world, *shape), on the backend's device."""
    world = get_world_size()
    if world == 1:
        return tensor.unsqueeze(0)
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        tensor = tensor.cuda()
    # the output is the inputs stacked along dim 0 (the layout both gloo and NCCL expect)
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    dist.all_gather_into_tensor(out, tensor.contiguous())
    return out.view(world, *tensor.shape)


def gather_shards_to_main(shard: torch.Tensor, total: int) -> Optional[torch.Tensor]:
    """The whole bank (total, D) in rank 0's CPU memory (None on other ranks) from every rank's
    shard (rows rank, rank + W, ..., as extract_feature_shard gives them). Shards travel one
    at a time, so no GPU ever holds more than its own shard and one other."""
    world, rank = get_world_size(), get_rank()
    if world == 1:
        return shard.cpu()
    device = shard.device
    if dist.get_backend() == "nccl" and not shard.is_cuda:
        device = torch.device("cuda", torch.cuda.current_device())
    rows = -(-total // world)  # the longest shard (rank 0's)
    buffer = torch.zeros((rows, shard.shape[1]), dtype=shard.dtype, device=device)
    if rank != 0:
        buffer[:len(shard)] = shard
        dist.send(buffer, dst=0)
        return None
    whole = torch.empty((total, shard.shape[1]), dtype=shard.dtype)
    whole[0::world] = shard.cpu()
    for source in range(1, world):
        dist.recv(buffer, src=source)
        count = len(range(source, total, world))
        whole[source::world] = buffer[:count].cpu()
    return whole


@torch.no_grad()
def _extract(model: nn.Module, data: Any, gather: bool, batch_size: int, num_workers: int,
             device: torch.device, forward: Optional[Callable], use_amp: bool,
             storage_device: Optional[torch.device], dtype: torch.dtype,
             print_freq: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shared body of extract_features / extract_feature_shard: (features, dataset indices)."""
    world, rank = get_world_size(), get_rank()
    if isinstance(data, torch.utils.data.DataLoader):
        loader = data
        sampler = loader.sampler
        if world > 1 and not (isinstance(sampler, torch.utils.data.DistributedSampler)
                              and not sampler.shuffle and not sampler.drop_last):
            raise ValueError("a distributed feature loader needs a DistributedSampler with "
                             "shuffle=False and drop_last=False")
    else:
        sampler = (torch.utils.data.DistributedSampler(data, world, rank, shuffle=False)
                   if world > 1 else torch.utils.data.SequentialSampler(data))
        loader = torch.utils.data.DataLoader(data, sampler=sampler, batch_size=batch_size,
                                             num_workers=num_workers,
                                             pin_memory=device.type == "cuda")
    total = len(loader.dataset)
    # DistributedSampler(shuffle=False) gives rank r the positions r, r + W, r + 2W, ... of
    # the dataset followed by wrap-around padding, so every rank has the same count. Position
    # p of this rank is dataset item r + p*W; items at or past `total` are padding.
    local_count = len(sampler)
    storage = storage_device or device
    forward = forward or model
    was_training = model.training
    model.eval()
    local: Optional[torch.Tensor] = None
    full: Optional[torch.Tensor] = None
    position = 0
    metric_logger = MetricLogger(delimiter="  ")
    finite = torch.ones((), dtype=torch.bool, device=device)  # read once at the end: no sync per batch
    for images, _ in metric_logger.log_every(loader, print_freq, "Extracting features:"):
        images = images.to(device, non_blocking=True)
        with feature_autocast(device, use_amp):
            feats = forward(images)
        finite &= torch.isfinite(feats).all()
        feats = feats.float().to(dtype)
        count = feats.shape[0]
        if gather:
            gathered = all_gather_stacked(feats)                    # (W, batch, D)
            if full is None:
                full = torch.empty((total, feats.shape[1]), dtype=dtype, device=storage)
            # (batch, W) order is dataset order: item (p, r) is r + p*W.
            rows = gathered.transpose(0, 1).reshape(-1, feats.shape[1])
            start = position * world
            keep = min(rows.shape[0], total - start)
            if keep > 0:
                full[start:start + keep] = rows[:keep].to(storage)
        else:
            if local is None:
                local =  torch.empty((local_count, feats.shape[1]), dtype=dtype, device=storage)
            local[position:position + count] = feats.to(storage)
        position += count
    model.train(was_training)
    if is_dist_avail_and_initialized():  # every rank stops, not only the one that saw it
        finite = finite.to(collective_device()).int()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():  # a NaN feature would be scored silently (k-NN votes, accuracy 0)
        raise UserError("the network's features are not finite (NaN or inf) for some images: "
                        "the weights are broken (e.g. saved from a diverged run); nothing was scored")
    if gather:
        return full, torch.arange(total)
    positions = torch.arange(local_count)
    valid = rank + positions * world < total
    indices = rank + positions[valid] * world
    return local[valid.to(local.device)], indices


def extract_features(model: nn.Module, data: Any, batch_size: int = 128, num_workers: int = 0,
                     device: Optional[torch.device] = None, forward: Optional[Callable] = None,
                     use_amp: bool = False, storage_device: Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32, print_freq: int = 50) -> torch.Tensor:
    """Features (N, D) of every item of a data set, in data set order, on every rank.

    data: a Dataset (sharded here with a DistributedSampler when distributed) or a DataLoader
    (its sampler must then be a non-shuffling DistributedSampler). forward(images) -> (B, D)
    defaults to model(images); it runs under torch.no_grad (and autocast on CUDA with
    use_amp). Padding added by the sampler is dropped, so each item is counted exactly once.
    Features are stored as `dtype` on `storage_device` (default: `device`).
    """
    device = device or torch.device("cpu")
    features, _ = _extract(model, data, True, batch_size, num_workers, device, forward,
                           use_amp, storage_device, dtype, print_freq)
    return features


def extract_feature_shard(model: nn.Module, dataset: torch.utils.data.Dataset,
                          batch_size: int = 128, num_workers: int = 0,
                          device: Optional[torch.device] = None, forward: Optional[Callable] = None,
                          use_amp: bool = False, storage_device: Optional[torch.device] = None,
                          dtype: torch.dtype = torch.float32,
                          print_freq: int = 50) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the features without any communication: (features, indices),
    indices being the data set positions (rank, rank + W, ...). Shards of all ranks together
    hold every item exactly once. For banks too large to copy to every process."""
    device = device or torch.device("cpu")
    return _extract(model, dataset, False, batch_size, num_workers, device, forward, use_amp,
                    storage_device, dtype, print_freq)
