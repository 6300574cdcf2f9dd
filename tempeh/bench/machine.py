"""A description of the machine a benchmark ran on (recorded beside every figure).

``describe()`` returns a JSON-able dict: CPU model, logical cores (and those this process may
use), ``torch.get_num_threads()``, RAM, OS, Python / torch / numpy versions, CUDA devices (or
that none is available), whether embree ray casting is available (trimesh), the load average
when the run started (a shared machine gives noisy figures) and the git commit of the tree.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

__all__ = ["describe", "cuda_available", "one_line"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _embree() -> Optional[bool]:
    try:
        import trimesh.ray
        return bool(getattr(trimesh.ray, "has_embree", False))
    except Exception:  # trimesh missing or broken: not available
        return None


def _git_commit() -> Optional[str]:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+modified" if dirty.stdout.strip() else "")


def cuda_available() -> bool:
    import torch
    return bool(torch.cuda.is_available())


def describe() -> Dict:
    """The machine, as a JSON-able dict (see the module docstring)."""
    import numpy
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda.append({"name": p.name, "memory_gib": round(p.total_memory / 1024 ** 3, 1)})
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": cuda,
        "cuda_note": None if cuda else "no CUDA device available",
        "embree": _embree(),
        "load_average_1_5_15": load,
        "git_commit": _git_commit(),
    }


def one_line(m: Dict) -> str:
    """A one-line summary of :func:`describe`'s dict."""
    gpu = ", ".join(c["name"] for c in m.get("cuda") or []) or "no CUDA device"
    return (f"{m['cpu']}, {m['logical_cores']} logical cores ({m['torch_threads']} torch threads), "
            f"{m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}, torch {m['torch']}, "
            f"numpy {m['numpy']}, {gpu}, embree {'yes' if m['embree'] else 'no'}")


if __name__ == "__main__":
    import json
    print(json.dumps(describe(), indent=1))
