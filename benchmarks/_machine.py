"""The machine a benchmark ran on, for its figures (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
