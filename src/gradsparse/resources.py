"""What the machine offers: its memory (for the up-front estimates that refuse a run, or a task,
that cannot fit)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["machine_memory"]


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
