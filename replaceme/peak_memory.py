"""Peak memory of this process per step: host RSS (Linux high-water mark, reset per step) and CUDA."""

from __future__ import annotations

import resource
from contextlib import suppress
from pathlib import Path

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak() -> None:
    """Start a new high-water mark, so the next reading covers one step, not the whole process."""
    with suppress(OSError):  # elsewhere the reading stays the process-wide peak
        _CLEAR_REFS.write_text("5")  # Linux: resets VmHWM to the current RSS
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mb() -> dict[str, float]:
    """Peak host RSS (and CUDA allocation) in MiB since the last reset_peak()."""
    peak = {"host_rss": _vm_hwm_kb() / 1024}
    if torch.cuda.is_available():
        peak["cuda_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return {key: round(value, 1) for key, value in peak.items()}


def _vm_hwm_kb() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
