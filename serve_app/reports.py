"""What every result file shares: strict JSON (NaN/inf as null) and a description of the machine.

Used by the offline reports, the benchmarks and the load tests alike (a leaf module: it imports
nothing of the project)."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path


def json_safe(value):
    """NaN/inf (e.g. an AUROC on a set with one class) become null: the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(report: dict, out: str | Path, indent: int = 2) -> Path:
    """``report`` as strict JSON at ``out`` (parent folders created)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=indent, allow_nan=False) + "\n")
    return path


def machine() -> dict:
    """Platform, CPU model, cores (and this process's affinity), memory and Python version."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
            "memory_gib": mem, "python": platform.python_version()}
