"""Peak RSS is the process's own (a child of a big parent does not report the parent's peak); freed large
blocks return to the system."""

import platform
import subprocess
import sys

import numpy as np
import pytest


def test_child_process_reports_its_own_peak_not_its_parents():
    ballast = np.ones(400 << 20, dtype=np.uint8)  # 400 MB touched in this (parent) process
    code = "from edgeft.runtime.memory import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert ballast.sum() == 400 << 20
    assert child < 300, f"the child reported {child:.0f} MB: its parent's 400 MB peak leaked into it"


FRAGMENTS = """
import sys
import numpy as np
if sys.argv[1] == "fixed":
    from edgeft.runtime.memory import return_large_frees_to_the_os
    assert return_large_frees_to_the_os()
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
big = np.ones(16 << 18, np.float32); del big  # a 16 MB block freed: glibc's dynamic rule raises its mmap threshold
blocks = [np.ones(1 << 19, np.float32) for _ in range(100)]  # 100 blocks of 2 MB
before = rss()
del blocks[::2]  # every other one freed: holes between live blocks
print(before - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_freed_weight_sized_blocks_go_back_to_the_system():
    """What the runtime sets before creating sessions (a session's freed initializers stayed resident)."""
    def returned(mode):
        out = subprocess.run([sys.executable, "-c", FRAGMENTS, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)

    assert returned("dynamic") < 20  # glibc's default: the 100 MB of holes stay resident
    assert returned("fixed") > 90
