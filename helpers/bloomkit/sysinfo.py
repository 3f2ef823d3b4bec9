"""What machine and library versions a measurement was taken on, and its raw speeds."""
from __future__ import annotations

import os
import platform
import time
from functools import lru_cache
from importlib import metadata

LIBRARIES = ["torch", "transformers", "accelerate", "deepspeed", "bitsandbytes", "safetensors",
             "tokenizers"]


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@lru_cache(maxsize=1)
def hardware() -> dict:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "torch_threads": torch.get_num_threads(), "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_bytes": p.total_memory})
    return info


def device_memory_bytes(device: str = "cpu") -> int:
    """Memory of the device a one-process run uses: RAM on the CPU, GPU 0's memory on CUDA."""
    hw = hardware()
    return hw["ram_bytes"] if device == "cpu" else hw["gpus"][0]["memory_bytes"]


def copy_bandwidth(nbytes: int = 256 * 2**20, device: str = "cpu", repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: a large tensor copy, counting bytes read + written.

    This is the number a memory-bound decode step is compared with: each step must read
    every weight once, so ``weight_bytes / copy_bandwidth`` is its lower bound.
    """
    import torch

    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def matmul_rate(n: int = 1024, dtype: str = "float32", device: str = "cpu", repeats: int = 5) -> float:
    """Measured dense matmul rate in FLOP/s (2*n^3 per product) for the given dtype."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    best = float("inf")
    for _ in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
