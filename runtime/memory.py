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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_the_os() -> bool:
    """Serve every allocation of 1 MB or more from its own mmap, so freeing it returns it to the system.

    Why: glibc raises its mmap threshold (up to 32 MB) after a large block is freed, so the many weight-sized
    blocks ONNX Runtime frees while it creates a session (an initializer replaced by its packed copy, a
    constant-folded one) can stay in the heap, resident. Which happens varied from one process to the next:
    SmolLM2-135M fp32's session peaked at 817-851 MB or 997-1,041 MB (four processes each way, same file
    and options), so a plan measured in one process missed the next by 200 MB. A fixed threshold turns the
    dynamic rule off: 832-835 MB in four of four, the forward pass as fast. Linux/glibc only; elsewhere a
    no-op (returns False)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def budget_warning(peak_mb: float, budget_mb: float | None, device: str) -> str | None:
    if budget_mb is None or peak_mb <= budget_mb:
        return None
    return (
        f"peak memory {peak_mb:.0f} MB exceeded the {budget_mb:.0f} MB budget of device '{device}': "
        "lower --batch-size or the bundle's max length, or use a smaller model"
    )
