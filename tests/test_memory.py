"""Peak RSS is the process's own: a child of a big parent does not report the parent's peak."""

import subprocess
import sys

import numpy as np


def test_child_process_reports_its_own_peak_not_its_parents():
    ballast = np.ones(400 << 20, dtype=np.uint8)  # 400 MB touched in this (parent) process
    code = "from edgeft.runtime.memory import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert ballast.sum() == 400 << 20
    assert child < 300, f"the child reported {child:.0f} MB: its parent's 400 MB peak leaked into it"
