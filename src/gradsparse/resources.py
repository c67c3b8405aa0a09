"""What the machine offers and what this process already uses: the machine's memory, this
process's resident and peak memory, and a task's dimension read from its options (for the
up-front estimates that refuse a run, or a task, that cannot fit)."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["machine_memory", "process_memory"]


def machine_memory() -> tuple[int | None, str]:
    """The machine's memory (MemTotal in /proc/meminfo), or the cgroup limit when smaller."""
    limit, source = None, ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                limit, source = int(line.split()[1]) * 1024, "MemTotal in /proc/meminfo"
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit() and (limit is None or int(text) < limit):
            limit, source = int(text), "the cgroup limit /sys/fs/cgroup/memory.max"
    except OSError:
        pass
    return limit, source


def process_memory() -> tuple[int, int]:
    """(resident now, peak so far) of this process in bytes (VmRSS in /proc/self/status and
    ``ru_maxrss``; the peak alone where /proc is missing)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    now = peak
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    return now, max(peak, now)
