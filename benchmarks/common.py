"""What every benchmark report states about the machine it ran on, and running the edgeft command."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
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


def edgeft_json(*cmd) -> dict:
    """``edgeft CMD ... --json`` in its own process (its peak RSS is its own); the JSON object it prints."""
    result = subprocess.run([sys.executable, "-m", "edgeft.cli", *map(str, cmd), "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"edgeft {' '.join(map(str, cmd[:2]))} failed: {result.stderr.strip().splitlines()[-3:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
