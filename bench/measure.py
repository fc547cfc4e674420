"""Measuring tools shared by the benchmarks: the device, its name, timed calls with the device's
queue drained, a measured GEMM peak, peak memory, the recipe's random crops and the JSON
results file. (Here, not in one benchmark, so that the benchmarks do not import each other.)"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

import devices

# The schedule values (epoch, lr, weight decay, teacher momentum) every timed training step runs at.
STEP_AT = (0, 1e-4, 0.04, 0.996)


def bench_device(choice: str) -> torch.device:
    """The device of a --device flag (auto, cpu, cuda), decided as training decides it."""
    return torch.device("cuda" if devices.resolve_use_cuda(choice) else "cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {devices.cpu_name()}, {torch.get_num_threads()} threads"


def header(device: torch.device) -> str:
    return f"device: {describe_device(device)}; torch {torch.__version__}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(work: Callable[[], Any], device: torch.device) -> Tuple[Any, float]:
    """work()'s result and its seconds, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - start


def best_seconds(work: Callable[[], Any], device: torch.device, rounds: int, calls: int = 1) -> float:
    """Seconds per call of work(): the best (least disturbed) of `rounds` rounds of `calls` calls."""
    return min(timed(lambda: [work() for _ in range(calls)], device)[1] for _ in range(rounds)) / calls


def seconds_per_item(work: Callable[[Any], Any], items: Iterable[Any]) -> float:
    """Mean seconds of work(item) over the items, on the host (no device queue to drain)."""
    items = list(items)
    start = time.perf_counter()
    for item in items:
        work(item)
    return (time.perf_counter() - start) / len(items)


def best_of_interleaved(works: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, float]:
    """Each work's best figure over `rounds` rounds that run the works one after another, so that
    the machine's load changes hit all of them alike."""
    figures: Dict[str, List[float]] = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            figures[name].append(work())
    return {name: min(values) for name, values in figures.items()}


def gemm_peak_gflops(size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best of five timed square GEMMs (after one warm-up) in dtype, in GFLOP/s."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    return 2 * size ** 3 / best_seconds(lambda: a @ b, device, rounds=5) / 1e9


def random_crops(args: argparse.Namespace, batch: int, uint8: bool = False) -> List[torch.Tensor]:
    """Random crops of the recipe's shapes on args.device (same draw every call): normalised
    floats, or uint8 images (what the loader hands the device stage)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [args.global_crops_size] * 2 + [args.local_crops_size] * args.local_crops_number
    if uint8:
        crops = [torch.randint(0, 256, (batch, 3, size, size), generator=generator, dtype=torch.uint8)
                 for size in sizes]
    else:
        crops = [torch.randn((batch, 3, size, size), generator=generator) for size in sizes]
    return [crop.to(args.device) for crop in crops]


def write_json(path: Optional[str], results: Any, indent: int = 2) -> None:
    """The results file of --output_json, when one is asked for."""
    if path:
        Path(path).write_text(json.dumps(results, indent=indent))


class PeakMemory:
    """Peak memory of the code run between start() and stop(), in MiB: CUDA's allocator peak
    above what was allocated at start() on a GPU; on CPU the growth of the process's peak
    resident set (VmHWM, reset at start()) over its size at start()."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:  # hand freed heap back to the OS so that the resident set is a fair baseline
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        self.base = _proc_status_kib("VmRSS") * 1024

    def stop(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_proc_status_kib("VmHWM") * 1024 - self.base) / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
