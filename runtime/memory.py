"""Peak resident memory of this process, and the check against a device's budget."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak RSS so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def budget_warning(peak_mb: float, budget_mb: float | None, device: str) -> str | None:
    if budget_mb is None or peak_mb <= budget_mb:
        return None
    return (
        f"peak memory {peak_mb:.0f} MB exceeded the {budget_mb:.0f} MB budget of device '{device}': "
        "lower --batch-size or the bundle's max length, or use a smaller model"
    )
