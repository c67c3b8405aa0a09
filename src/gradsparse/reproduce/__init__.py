"""Paper reproductions: one named reproduction per experiment group of EXPERIMENTS.md.

    gradsparse reproduce --list
    gradsparse reproduce zou-toy [--scale small|full] [--seeds 3] [--out DIR]
    gradsparse reproduce all --scale small

Each reproduction (see :mod:`.base`) writes its runs, figures, ``report.md`` and
``summary.json`` (per claim a verdict computed from the measurements by a stated rule).
The modules are named after the papers' first authors: :mod:`.alistarh` (paper 000),
:mod:`.candela` (001), :mod:`.sahu` (002), :mod:`.zou` (003), :mod:`.zhao` (004).
"""

from __future__ import annotations

import importlib

from .base import Claim, Context, DataMissing, Reproduction, RunResult, execute

#: modules that define reproductions, in paper order; each has REPRODUCTIONS: list[Reproduction]
MODULES = ("alistarh", "candela", "sahu", "zou", "zhao")


def reproductions() -> dict[str, Reproduction]:
    """name -> Reproduction, in paper order (modules not written yet are skipped)."""
    table: dict[str, Reproduction] = {}
    for module in MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{module}":
                continue
            raise
        for rep in mod.REPRODUCTIONS:
            if rep.name in table:
                raise RuntimeError(f"two reproductions named {rep.name!r}")
            table[rep.name] = rep
    return table


def get(name: str) -> Reproduction:
    table = reproductions()
    if name not in table:
        raise ValueError(f"unknown reproduction {name!r}; allowed: {', '.join(table)} (or 'all')")
    return table[name]


__all__ = ["Claim", "Context", "DataMissing", "Reproduction", "RunResult", "execute", "get", "reproductions"]
