"""What every ``gradsparse`` command shares: the one-line argument parser, the one-line error,
and how a config argument is found (a path or a shipped example name). A leaf: the commands
(:mod:`gradsparse.cli`, :mod:`gradsparse.bench`, :mod:`gradsparse.distributed.launch`) import it,
it imports none of them."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

__all__ = ["OneLineParser", "UsageError", "error", "example_path", "resolve_config"]


def example_path(name: str) -> Path:
    """Where the shipped example ``name`` (``.yaml`` added when there is no suffix) lies."""
    base = resources.files("gradsparse") / "examples"
    p = Path(str(base / name))
    if not p.suffix:
        p = p.with_suffix(".yaml")
    return p


def resolve_config(arg: str) -> Path:
    """A config argument: a path that exists, else a shipped example of that name, else the path."""
    p = Path(arg)
    if p.exists():
        return p
    ex = example_path(arg)
    return ex if ex.exists() else p


class UsageError(Exception):
    """A malformed command line (argparse's complaint), reported as one line by each command's ``main``."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``gradsparse: error:`` line (no usage block) and
    exit status 2; ``--help`` still prints the usage."""

    def error(self, message: str):
        sub = self.prog[len("gradsparse"):].strip() if self.prog.startswith("gradsparse") else self.prog
        raise UsageError(f"{sub + ': ' if sub else ''}{message} (see {self.prog} --help)")


def error(message: str, code: int = 2) -> int:
    """Print ``gradsparse: error: MESSAGE`` as one line on stderr; returns the exit status."""
    print(f"gradsparse: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code
