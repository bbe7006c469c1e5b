"""What a benchmark prints about the machine it ran on (imported as `host`: the script's folder is on sys.path)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess


def machine() -> str:
    """The CPU model (lscpu) and its logical CPU count: ratios depend on it."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if found:
            return f"{found.group(1).strip()}, {os.cpu_count()} logical CPUs"
    return f"unknown CPU, {os.cpu_count()} logical CPUs"


def load_average() -> str:
    """The 1/5/15-minute load: a busy host makes every number of the run slower."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
