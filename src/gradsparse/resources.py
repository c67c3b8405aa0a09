"""What the machine offers and what this process already uses: the machine's memory, this
process's resident and peak memory, and a task's dimension read from its options (for the
up-front estimates that refuse a run, or a task, that cannot fit)."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

__all__ = ["machine_memory", "process_memory", "task_dimension"]


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


def task_dimension(name: str, options: dict[str, Any]) -> tuple[int, int] | None:
    """(d, bytes per parameter) of task ``name`` with ``options``, read from the options alone
    (nothing is built), for the tasks whose d the options fix: ``toy_quadratic`` (dim),
    ``linreg`` (n_features) and ``logreg`` on a generated or fixed data set (its features); None
    for the others (their d is known once the task is built). Never more than the built task's d."""
    from .tasks import TASKS, task_options

    if name not in TASKS:
        return None
    opts = {**task_options(name), **options}
    elem = 8 if opts.get("dtype") in ("float64", "double") else 4
    try:
        if name == "toy_quadratic":
            return int(opts["dim"]), elem
        if name == "linreg":
            return int(opts["n_features"]), elem
        if name == "logreg" and opts.get("libsvm_path") is None:
            fixed = {"breast_cancer": 30, "mnist_4v9": 784}
            default = {"gisette_like": 5000, "madelon_like": 500}
            dataset = opts.get("dataset")
            if dataset in fixed:
                return fixed[dataset], elem
            if dataset in default:
                return int(opts.get("n_features") or default[dataset]), elem
    except (TypeError, ValueError, KeyError):
        return None
    return None
