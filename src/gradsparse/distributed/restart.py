"""Per-rank restart checkpoints for ``engine: torch``, so a job restarted by ``torchrun
--max-restarts`` (or started again with the same command) continues where it stopped.

Where: next to the run directory ``OUT``, in ``OUT/../.OUT.restart/`` (one folder for every
rank: one machine, or several machines sharing that file system):

    manifest.json            world size, the run's config and its SHA-256 (rank 0 writes it;
                             ``gradsparse launch --resume OUT`` reads the config from it)
    rank{r}-step{t}.pt       rank r's whole state at step t: the engine's state_dict (model,
                             memories, momentum, server state, data order, RNG, byte counters)
                             and the runner's (metric rows so far), plain tensors and lists,
                             loadable with ``weights_only=True``

Each file is written to a temporary name and renamed into place, so a file that exists is whole;
each rank keeps its two newest steps. A rank that dies while saving can leave the ranks at
different newest steps, so on start every rank lists the steps it has and the ranks agree (one
``all_gather_object``) on the newest step that all of them have; each rank loads its own file
of that step. The run then continues from there and produces what the uninterrupted run
would have. When the run completes, rank 0 removes the folder.

A restart folder written with another world size or another config is a clear error (delete
the folder to start afresh): its memories belong to other workers or another algorithm.
Checkpoints are written every ``checkpoint_every`` steps of the config; without it a restarted
job starts from step 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

_FILE = re.compile(r"^rank(\d+)-step(\d+)\.pt$")
KEEP = 2


def restart_dir(run_dir: str | Path) -> Path:
    """The restart folder of run directory ``run_dir`` (a hidden sibling)."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.restart")


class RestartCheckpoints:
    """Rank ``rank``'s view of the restart folder of one run (see the module docstring)."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, config_text: str) -> None:
        self.dir = restart_dir(run_dir)
        self.rank, self.world_size = rank, world_size
        self.config_text = config_text
        self.config_sha256 = hashlib.sha256(config_text.encode()).hexdigest()

    # ---- checking what is there -------------------------------------------------------------

    def check_manifest(self) -> None:
        """Raise ValueError when the folder was written by another world size or config."""
        path = self.dir / "manifest.json"
        if not path.is_file():
            return
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable restart manifest ({exc}); delete {self.dir} to start afresh") from None
        if manifest.get("world_size") != self.world_size:
            raise ValueError(f"restart checkpoints in {self.dir} were written by {manifest.get('world_size')} ranks, "
                             f"this job has {self.world_size}; delete {self.dir} to start afresh")
        if manifest.get("config_sha256") != self.config_sha256:
            raise ValueError(f"restart checkpoints in {self.dir} were written by a different config; "
                             f"delete {self.dir} to start afresh")

    def steps(self) -> list[int]:
        """The steps this rank has a checkpoint of, ascending."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _FILE.match(p.name)
            if m and int(m.group(1)) == self.rank:
                found.append(int(m.group(2)))
        return sorted(found)

    def common_step(self) -> int | None:
        """The newest step every rank has a checkpoint of (a collective: every rank calls it)."""
        mine = self.steps()
        everyone: list[list[int] | None] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        common = set(everyone[0] or [])
        for steps in everyone[1:]:
            common &= set(steps or [])
        return max(common) if common else None

    def load(self, step: int) -> dict:
        return torch.load(self._path(step), weights_only=True)

    # ---- writing --------------------------------------------------------------------------

    def save(self, step: int, state: dict) -> None:
        """Write this rank's state at ``step`` atomically; keep the newest :data:`KEEP` steps."""
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        if self.rank == 0 and not manifest.is_file():
            _atomic_write(manifest, json.dumps({"world_size": self.world_size, "config_sha256": self.config_sha256,
                                                "config": self.config_text}))
        path = self._path(step)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in self.steps()[:-KEEP]:
            self._path(old).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, step: int) -> Path:
        return self.dir / f"rank{self.rank}-step{step:09d}.pt"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def injected_failure(spec: str | None, rank: int, restart_count: int):
    """``GRADSPARSE_FAIL_ONCE_AT=RANK:STEP`` (a test hook): an ``on_step`` callback that makes
    rank RANK raise after step STEP in the first attempt only (torchrun's restart count 0), to
    test restarts; None when unset or for another rank."""
    if not spec or restart_count > 0:
        return None
    try:
        fail_rank, fail_step = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"GRADSPARSE_FAIL_ONCE_AT={spec!r}: expected RANK:STEP, e.g. 1:7") from None
    if fail_rank != rank:
        return None

    def on_step(step: int) -> None:
        if step == fail_step:
            raise RuntimeError(f"injected failure on rank {rank} after step {step} (GRADSPARSE_FAIL_ONCE_AT)")

    return on_step


def read_manifest(run_dir: str | Path) -> dict:
    """The restart manifest of run directory ``run_dir`` (world size, config text), or a
    ValueError saying why there is none to continue from."""
    path = restart_dir(run_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"no restart checkpoints for {str(run_dir)!r} (looked for {path}): a torch run keeps them "
                         "only with checkpoint_every in its config, and removes them once it completes")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable restart manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), str) \
            or not isinstance(manifest.get("world_size"), int):
        raise ValueError(f"{path}: the manifest holds no config (written by an older version?); continue with "
                         "the original launch command instead")
    return manifest
