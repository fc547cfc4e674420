"""Which device a process runs on and what it can do: --device auto|cuda|cpu, the GPU of a
local rank, whether the torch build runs on the GPUs, the one precision rule (autocast dtype,
TF32), the CPU's name and bf16 support, peak and total memory."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import ContextManager, Dict, Iterator, Optional, Sequence, Tuple

import torch

from errors import UserError


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


def autocast_dtype(device: torch.device, use_fp16: bool, cpu_bf16: bool = False) -> Optional[torch.dtype]:
    """The one precision rule of network passes: the autocast dtype, None for fp32.

    On CUDA with use_fp16 (--use_fp16): bf16 on compute capability 8.0+ (Ampere and newer,
    native bf16 and flash attention), else fp16 with loss scaling as in DINO (torch reports
    bf16 as supported on V100/T4 too, but emulated). On the CPU with cpu_bf16 (--cpu_bf16):
    bf16 (callers first check cpu_bf16_shortfall: emulated bf16 is far slower than fp32)."""
    if device.type == "cuda":
        if not use_fp16:
            return None
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.bfloat16 if cpu_bf16 else None


def autocast(device: torch.device, use_fp16: bool, cpu_bf16: bool = False) -> ContextManager:
    """Autocast in autocast_dtype's precision, or nothing for fp32."""
    dtype = autocast_dtype(device, use_fp16, cpu_bf16)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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


def peak_memory_mib() -> float:
    """Peak memory so far in MiB: CUDA's allocator peak on a GPU (DINO's `max mem`), else the
    peak resident set of this process (getrusage's ru_maxrss, KiB on Linux)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of a CUDA device, or the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
