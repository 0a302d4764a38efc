"""Peak resident memory of this process, and the check against a device's budget."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak RSS of this process so far.

    On Linux, VmHWM (/proc/self/status): getrusage's ru_maxrss survives fork and exec, so a
    training process started by one that held torch and a model (``edgeft demo``) would report
    its parent's peak. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def budget_warning(peak_mb: float, budget_mb: float | None, device: str) -> str | None:
    if budget_mb is None or peak_mb <= budget_mb:
        return None
    return (
        f"peak memory {peak_mb:.0f} MB exceeded the {budget_mb:.0f} MB budget of device '{device}': "
        "lower --batch-size or the bundle's max length, or use a smaller model"
    )
