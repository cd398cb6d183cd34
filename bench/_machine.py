"""The machine a benchmark ran on, for the line every bench prints beside its ratios."""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """The CPU model as `lscpu` reports it (falls back to the platform's processor string)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"
