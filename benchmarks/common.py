"""What every benchmark report states about the machine it ran on."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from importlib.metadata import version
from pathlib import Path


def machine_facts(packages: tuple[str, ...]) -> dict:
    """CPU, cores, load average (read before the benchmark's own work), versions, date and command line."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg(),
            **{name: version(name) for name in packages},
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
