"""What a result was computed on: the CPU model, PyTorch's kernel path and thread count.

A trained model differs from one CPU code path to another (float reductions follow the SIMD
width, and training amplifies the difference), so a trained model's metrics name the setup that
trained it.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's name."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def compute_setup() -> dict[str, Any]:
    """This process's setup: ``{"capability", "threads", "cpu"}``. ``capability`` is the kernel
    path PyTorch dispatches to (``ATEN_CPU_CAPABILITY`` can lower it: default, avx2, avx512)."""
    import torch

    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cpu": cpu_model()}


def merge_setups(setups: list[dict[str, Any]]) -> dict[str, str]:
    """One value per field over the setups that trained a model, distinct values joined by
    ``+`` in first-seen order (a run resumed on another setup shows both)."""
    out: dict[str, str] = {}
    for key in ("capability", "threads", "cpu"):
        seen = list(dict.fromkeys(str(s[key]) for s in setups if key in s))
        out[key] = "+".join(seen)
    return out
