"""What this machine is and what it does fast: its name for the figures a run or a benchmark reports, and
whether bf16 arithmetic is native here."""
import contextlib
import os
import platform
from pathlib import Path

import torch


def fast_bf16(device):
    """Whether bf16 autocast speeds this device up: GPUs, and CPUs with native bf16 (AVX-512 BF16 or AMX).
    Elsewhere bf16 is emulated: on a 2-core AVX2 EPYC it made ResNet18 training 5x slower than float32."""
    if torch.device(device).type == "cuda":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def machine(device=None):
    """What runs on `device` (default: the GPU when there is one), for every figure a report or the benchmark
    quotes: the GPU's name, or the CPU model, cores and torch threads."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
