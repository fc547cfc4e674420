"""Measuring tools shared by the benchmarks: the device's name, synchronisation, a measured GEMM
peak and peak memory. (Here, not in one benchmark, so that the benchmarks do not import each
other.)"""
from __future__ import annotations

import ctypes
import gc
import time
from pathlib import Path

import torch

import devices


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {devices.cpu_name()}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_peak_gflops(size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best of five timed square GEMMs (after one warm-up) in dtype, in GFLOP/s."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(6):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


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
