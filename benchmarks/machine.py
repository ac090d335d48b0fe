"""A description of the machine a benchmark ran on, and repository-relative paths (for every result file)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: "str | Path") -> str:
    """``path`` relative to the repository (as given, or after following links: ``runs`` may be a link out of a
    worktree); a path outside it is reduced to its name. Results never hold a path of the machine they ran on."""
    for p in (Path(os.path.abspath(path)), Path(path).resolve()):
        if p.is_relative_to(ROOT):
            return p.relative_to(ROOT).as_posix()
    return Path(path).name
