"""How a run ends before its last step: the exceptions :func:`~gradsparse.experiments.runner.run`
raises after writing the run directory with that status, each with the CLI's exit code.

=================  ==============  =========================================================
exception          summary status  exit code
=================  ==============  =========================================================
RunDiverged        ``diverged``    3 (``on_nonfinite`` met a non-finite value)
RunFailed          ``failed``      4 (a write of the run directory failed)
RunInterrupted     ``interrupted`` 128 + signal: 130 (SIGINT) / 143 (SIGTERM)
=================  ==============  =========================================================
"""

from __future__ import annotations

from pathlib import Path


class RunEnded(Exception):
    """A run that ended before its last step; the run directory holds its summary."""

    status = "ended"
    exit_code = 1

    def __init__(self, message: str, run_dir: Path | None = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir


class RunDiverged(RunEnded, FloatingPointError):
    """``on_nonfinite: stop`` met a non-finite value (summary status ``diverged``; CLI exit 3)."""

    status = "diverged"
    exit_code = 3


class RunFailed(RunEnded):
    """A write of the run directory failed (disk full, I/O error, read-only file system): one line
    (CLI exit 4). The run directory, when the run had written a checkpoint, is installed with
    status ``failed`` and that checkpoint (continue with ``--resume`` once there is space); a
    resumed run's previous checkpoint is kept."""

    status = "failed"
    exit_code = 4


class RunInterrupted(RunEnded):
    """SIGINT / SIGTERM: the step finished, a checkpoint and the summary (status
    ``interrupted``) were written (CLI exit 128 + signal: 130 / 143)."""

    status = "interrupted"

    def __init__(self, message: str, run_dir: Path | None, signum: int) -> None:
        super().__init__(message, run_dir)
        self.signum = signum
        self.exit_code = 128 + int(signum)
