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

Each file is written to a temporary name, flushed to disk and renamed into place, so a file that
exists is whole; each rank keeps its two newest steps, and removes the older one only after the
newer one is written. A rank that dies while saving can leave the ranks at different newest
steps, and a file can still be damaged later (a disk that lost its cache, a copy cut short), so
on start every rank *reads* each of its files (a file that does not load with
``weights_only=True``, or holds no engine state of its step, is skipped with one line naming it
and why: truncated, garbage, empty, another program's pickle) and the ranks agree (one
``all_gather_object``) on the newest step whose file every rank can read; each rank loads its own
file of that step. The run then continues from there and produces what the uninterrupted run
would have. When the run completes, rank 0 removes the folder.

A restart folder written with another world size or another config is a clear error (delete
the folder to start afresh): its memories belong to other workers or another algorithm; so is a
folder that holds checkpoints but no ``manifest.json`` (nothing says which run wrote them). Rank 0
writes the manifest before the first step, so every checkpoint has one. Checkpoints are written
every ``checkpoint_every`` steps of the config; without it a restarted job starts from step 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..experiments.rundir import process_alive

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
        """Raise ValueError when the folder was written by another world size or config, or holds
        checkpoints without a manifest."""
        path = self.dir / "manifest.json"
        if not path.is_file():
            orphans = sorted(p.name for p in self.dir.iterdir() if _FILE.match(p.name)) if self.dir.is_dir() else []
            if orphans:
                raise ValueError(f"restart checkpoints in {self.dir} ({', '.join(orphans[:3])}"
                                 f"{', ...' if len(orphans) > 3 else ''}) have no manifest.json, so nothing says which "
                                 f"run and config wrote them; delete {self.dir} to start afresh")
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

    def readable_steps(self) -> tuple[list[int], dict[int, str]]:
        """This rank's steps whose file loads and holds the engine's state of that step, and why
        each other file cannot be used (step -> reason)."""
        good, bad = [], {}
        for step in self.steps():
            why = self.problem(step)
            if why is None:
                good.append(step)
            else:
                bad[step] = why
        return good, bad

    def problem(self, step: int) -> str | None:
        """Why the file of ``step`` cannot be resumed from (None: it can)."""
        path = self._path(step)
        try:
            size = path.stat().st_size
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if size == 0:
            return "empty"
        try:
            sd = torch.load(path, weights_only=True)
        except Exception as exc:  # truncated zip, garbage bytes, a pickle of foreign objects
            text = " ".join(str(exc).split())
            return f"does not load ({type(exc).__name__}: {text[:120]}{'...' if len(text) > 120 else ''})"
        if not isinstance(sd, dict) or not isinstance(sd.get("runner"), dict) or "t" not in sd:
            return "loads, but holds no gradsparse engine state (another program's file?)"
        try:
            t = int(sd["t"])
        except (TypeError, ValueError):
            return "holds no step counter"
        if t != step:
            return f"holds the state of step {t}, not {step}"
        return None

    def common_readable_step(self, say=None) -> int | None:
        """The newest step whose file every rank can read (a collective: every rank calls it).
        Each rank says, once, which of its files it skips and why (``say``: print by default)."""
        say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        good, bad = self.readable_steps()
        everyone: list[list[int] | None] = [None] * self.world_size
        dist.all_gather_object(everyone, good)
        common = set(everyone[0] or [])
        for steps in everyone[1:]:
            common &= set(steps or [])
        step = max(common) if common else None
        for t, why in sorted(bad.items()):
            say(f"gradsparse: rank {self.rank}: skipped restart checkpoint {self._path(t)}: {why}")
        newer = [t for t in good if step is None or t > step]
        for t in newer:
            missing = [r for r, steps in enumerate(everyone) if t not in (steps or [])]
            say(f"gradsparse: rank {self.rank}: skipped restart checkpoint {self._path(t)}: rank(s) "
                f"{', '.join(map(str, missing))} have no readable checkpoint of step {t}")
        return step

    def load(self, step: int) -> dict:
        return torch.load(self._path(step), weights_only=True)

    # ---- writing --------------------------------------------------------------------------

    def write_manifest(self) -> None:
        """Rank 0, before the first step: the manifest that says which run the checkpoints are of."""
        from ..experiments.rundir import atomic_write_text, storage

        manifest = self.dir / "manifest.json"
        if manifest.is_file():
            return
        with storage("the restart folder", self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest, json.dumps({"world_size": self.world_size, "config_sha256": self.config_sha256,
                                                "config": self.config_text}))

    def save(self, step: int, state: dict) -> None:
        """Write this rank's state at ``step`` atomically (flushed to disk before the rename); then
        keep the newest :data:`KEEP` steps. A failed write raises
        :class:`~gradsparse.experiments.rundir.StorageError` and removes nothing."""
        from ..experiments.rundir import atomic_save, storage

        with storage("the restart folder", self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self.write_manifest()
        atomic_save(state, self._path(step))
        for old in self.steps()[:-KEEP]:
            self._path(old).unlink(missing_ok=True)

    def clean_temporaries(self) -> list[str]:
        """Remove this rank's half-written temporaries (``.rank{r}-step*.pt.tmp-PID``) of
        processes that no longer run (a rank killed while saving)."""
        removed = []
        if not self.dir.is_dir():
            return removed
        pattern = re.compile(rf"^\.rank{self.rank}-step\d+\.pt\.tmp-(\d+)$")
        for p in self.dir.iterdir():
            m = pattern.match(p.name)
            if m and int(m.group(1)) != os.getpid() and not process_alive(int(m.group(1))):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

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
