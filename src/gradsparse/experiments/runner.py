"""Run a validated config on its engine and write a run directory: :func:`run`, :func:`resume`
and what both do (:func:`_execute`: build the engine, check the outputs, load a checkpoint, hand
the steps to :class:`~gradsparse.experiments.loop.StepLoop`).

A run directory holds:

* ``config.yaml``   the resolved config (overrides applied, defaults filled in), headed by the run id;
* ``metrics.csv``   one row per recording step (column names: :mod:`gradsparse.metrics`);
* ``summary.json``  final value of each metric, totals, steps, wall seconds;
* ``checkpoint.pt`` engine state at the end (model, memories and momentum keyed by segment, RNG,
  counters; plain tensors, loads under ``torch.load(weights_only=True)``);
* ``residual_ratio.csv`` when ``metrics.residual_ratio.steps`` is set;
* ``worker_error_norms.csv`` when ``metrics.per_worker_error_norms`` is set;
* ``stages.csv`` for stagewise learning: each stage's average w~_s and the loss there;
* PNG plots: loss vs step and vs bytes, memory norm, density (and residual ratio).

Where each part lives: :mod:`.build` (config -> engine, the pre-run checks), :mod:`.rundir`
(where a run directory may go, its lock, putting it in place, storage errors), :mod:`.run_state`
(run id, config identity, what a checkpoint carries for the runner), :mod:`.loop` (the step loop,
signals, how a run ends), :mod:`.outputs` (summary.json and the side CSVs), :mod:`.errors` (the
exceptions of a run that ended early, with their exit codes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, RunConfig, dump_config, load_config
from ..metrics import METRICS, RUNNING_MAXIMA
from .asynchronous import AsyncRowStats
from .build import build_engine, total_steps
from .errors import RunFailed
from .loop import StepLoop
from .rundir import RunLock, check_out_dir, clean_leftovers, default_out, partial_dir, storage
from .run_state import RunState, config_differences, describe_changes, run_id_of_config

# Re-exported for code that imported them from here before runner.py was split by idea (the
# package's own modules and tests import them from their homes): the exceptions (.errors),
# StopSignals (.loop), the run-directory checks (.rundir), the run identity (.run_state) and
# async_summary (.outputs).
from .errors import RunDiverged, RunEnded, RunInterrupted  # noqa: F401
from .loop import StopSignals  # noqa: F401
from .outputs import async_summary  # noqa: F401
from .rundir import RUN_FILES, is_run_dir  # noqa: F401
from .run_state import config_sha256  # noqa: F401

__all__ = ["run", "resume", "metric_names", "check_outputs", "RunFailed", "RunDiverged", "RunEnded", "RunInterrupted",
           "StopSignals", "async_summary", "RUN_FILES", "is_run_dir", "config_sha256"]


def run(cfg: RunConfig, out: str | Path | None = None, *, progress: bool | None = None,
        overwrite: bool = False, resume_state: dict | None = None,
        on_checkpoint: Callable[[int, dict], None] | None = None,
        on_step: Callable[[int], None] | None = None, allow_config_change: bool = False) -> Path:
    """Run ``cfg``; returns the run directory (status ``completed``). Raises ConfigError before
    anything is written (:class:`~gradsparse.experiments.rundir.RunDirectoryBusy` when another
    process writes the same directory), :class:`RunDiverged` / :class:`RunInterrupted` after
    writing the run directory with that status, :class:`RunFailed` when a write failed. The
    directory is written into a temporary sibling and renamed into place, so it is whole or
    absent; the run holds the directory's lock throughout (one writer).

    For the torch.distributed worker (:mod:`gradsparse.distributed.restart`): ``resume_state``
    (a ``checkpoint.pt`` dict) starts the run from that state; ``on_checkpoint(step, state)`` is
    called after each checkpoint the run writes; ``on_step(step)`` after each step."""
    if out is not None and not str(out).strip():
        raise ConfigError("--out '': an empty path; give a directory for the run")
    final = Path(out) if out is not None else default_out(cfg)
    check_out_dir(final, overwrite=overwrite)
    if final.is_symlink() and final.is_dir():  # write where the link points (the link stays)
        final = Path(os.path.realpath(final))
    lock = RunLock(final).acquire()
    try:
        clean_leftovers(final)
        check_out_dir(final, overwrite=overwrite)  # again, under the lock: another run may have ended meanwhile
        return _execute(cfg, final, progress=progress, resume=resume_state, on_checkpoint=on_checkpoint,
                        on_step=on_step, allow_config_change=allow_config_change, lock=lock)
    finally:
        lock.release()


def resume(run_dir: str | Path, *, progress: bool | None = None, allow_config_change: bool = False) -> Path:
    """Continue the run in ``run_dir`` from its checkpoint: the same metrics.csv and final state
    as the uninterrupted run, bitwise.

    Refused (ConfigError) when the checkpoint belongs to another run (its run id differs from the
    one in config.yaml or summary.json), when config.yaml differs from the config the checkpoint
    was written with (each changed key named) unless ``allow_config_change`` (the changes are then
    recorded in summary.json's ``config_changes``), when ``steps`` is below the checkpoint's step,
    and when the run already completed. The directory's checkpoint stays until a newer one is
    written (a resumed run that diverges again before its next checkpoint keeps it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        from ..distributed.restart import restart_dir

        if (restart_dir(run_dir) / "manifest.json").is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: a stopped engine 'torch' run (only its restart checkpoints "
                              f"exist): continue it with gradsparse launch --resume {run_dir}")
        raise ConfigError(f"--resume {str(run_dir)!r}: not a directory")
    if run_dir.is_symlink():
        run_dir = Path(os.path.realpath(run_dir))
    lock = RunLock(run_dir, key="--resume").acquire()
    try:
        clean_leftovers(run_dir)
        return _resume_locked(run_dir, progress, allow_config_change, lock)
    finally:
        lock.release()


def _resume_locked(run_dir: Path, progress, allow_config_change: bool, lock) -> Path:
    where = f"--resume {str(run_dir)!r}"
    for f in ("config.yaml", "checkpoint.pt"):
        if not (run_dir / f).is_file():
            raise ConfigError(f"{where}: no {f} (is it a run directory with a checkpoint?)")
    summary = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (ValueError, OSError):
            summary = {}
        summary = summary if isinstance(summary, dict) else {}
    if summary.get("status") == "completed":
        raise ConfigError(f"{where}: the run is already completed")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.engine == "torch":
        raise ConfigError(f"{where}: an engine 'torch' run continues under torchrun from its "
                          f"per-rank restart checkpoints: gradsparse launch --resume {run_dir}")
    if cfg.engine == "torch_async":
        raise ConfigError(f"{where}: an engine 'torch_async' run keeps no restart checkpoints "
                          "(real timing makes it unrepeatable); start it again")
    check_out_dir(run_dir, overwrite=True, key="--resume")
    try:
        sd = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"{where}: checkpoint.pt cannot be read ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]})") from None
    if not isinstance(sd, dict) or not isinstance(sd.get("runner"), dict):
        raise ConfigError(f"{where}: checkpoint.pt holds no runner state (written by an older version?)")
    runner_sd = sd["runner"]
    ours = runner_sd.get("run_id")
    if not ours:
        if not allow_config_change:
            raise ConfigError(f"{where}: checkpoint.pt carries no run id (written by an older gradsparse), so it "
                              "cannot be checked to belong to this run and config; continue anyway with "
                              "--allow-config-change")
    else:
        text = (run_dir / "config.yaml").read_text()
        for name, theirs in (("config.yaml", run_id_of_config(text)), ("summary.json", summary.get("run_id"))):
            if theirs is not None and theirs != ours:
                raise ConfigError(f"{where}: checkpoint.pt belongs to run {ours}, but {name} to run {theirs}: the "
                                  "checkpoint comes from another run directory; put back this run's checkpoint.pt "
                                  "(or start a new run)")
    return _execute(cfg, run_dir, progress=progress, resume=sd, carry_checkpoint=run_dir / "checkpoint.pt",
                    allow_config_change=allow_config_change, resume_key=where, lock=lock)


def metric_names(cfg: RunConfig) -> list[str]:
    return list(dict.fromkeys(["step", "epoch", *cfg.metrics.names]))


def check_outputs(cfg: RunConfig, engine) -> None:
    """What the run records must suit the engine and the run's length (ConfigError), and
    TensorBoard output needs the ``tensorboard`` package; checked before anything is written."""
    steps = total_steps(cfg, engine)
    names = metric_names(cfg)
    bad = [s for s in cfg.metrics.residual_ratio.steps if not 1 <= s <= steps]
    if bad:
        raise ConfigError(f"config key 'metrics.residual_ratio.steps': steps {bad} outside 1..{steps}")
    unsupported = [m for m in names if m not in engine.metrics]
    if unsupported:
        raise ConfigError(f"config key 'metrics.names': engine {engine.name!r} does not record {unsupported} "
                          f"(it records: {', '.join(m for m in METRICS if m in engine.metrics)})")
    if cfg.metrics.tensorboard:
        from .tensorboard import require_tensorboard

        require_tensorboard("config key 'metrics.tensorboard'")


def _execute(cfg: RunConfig, final: Path, *, progress: bool | None, resume: dict | None,
             on_checkpoint=None, on_step=None, carry_checkpoint: Path | None = None,
             allow_config_change: bool = False, resume_key: str | None = None, lock=None) -> Path:
    engine = build_engine(cfg)
    check_outputs(cfg, engine)
    steps = total_steps(cfg, engine)
    names = metric_names(cfg)
    engine.track_total_error = "total_error" in names
    columns = [m for m in METRICS if m in names]
    # per-step metrics the running maxima need are computed at every step
    tracked = {RUNNING_MAXIMA[m] for m in names if m in RUNNING_MAXIMA}
    state = RunState(columns)
    state.maxima = {m: -math.inf for m in names if m in RUNNING_MAXIMA}
    state.config = dump_config(cfg)
    if resume is not None:
        where = resume_key or f"--resume {str(final)!r}"
        runner_sd = resume["runner"]
        written_with = runner_sd.get("config")
        if written_with is not None and written_with != state.config:
            changes = config_differences(written_with, state.config)
            if not allow_config_change:
                raise ConfigError(f"{where}: the config differs from the one the checkpoint was written with: "
                                  f"{describe_changes(changes)}; restore it, or pass --allow-config-change to "
                                  "continue with the changed config (recorded in summary.json)")
        else:
            changes = {}
        at = int(resume.get("t", 0))
        if steps < at:
            raise ConfigError(f"config key 'steps': the run is to end at step {steps}, below the checkpoint's step "
                              f"{at}; a resumed run continues from its checkpoint, so give steps >= {at}")
        try:
            engine.load_state_dict({k: v for k, v in resume.items() if k != "runner"})
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"{where}: checkpoint does not fit the run's config: {exc}") from None
        state.load_state_dict(runner_sd)
        engine.alg.skipped_messages = state.skipped
        if changes:
            state.config_changes.append({"at_step": at, "changes": changes})
            print(f"gradsparse: note: resuming {final} at step {at} with a changed config (--allow-config-change): "
                  f"{describe_changes(changes)}", file=sys.stderr)
    async_stats = AsyncRowStats(engine, names) if engine.is_asynchronous else None

    final = Path(final)
    tmp = partial_dir(final)
    with storage("the run directory", tmp):
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if lock is not None:
        lock.keep_created()
    try:
        if carry_checkpoint is not None:
            # the checkpoint being resumed stays in the new directory until a newer one replaces it
            _carry(carry_checkpoint, tmp / "checkpoint.pt")
        loop = StepLoop(cfg=cfg, engine=engine, steps=steps, names=names, columns=columns, tracked=tracked,
                        state=state, async_stats=async_stats, final=final, tmp=tmp, progress=progress,
                        on_checkpoint=on_checkpoint, on_step=on_step)
        return loop.run()
    except RunFailed:
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _carry(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (a hard link when the file system allows: no bytes copied;
    checkpoints are replaced by rename, never written in place, so the link never changes ``src``)."""
    with storage("the checkpoint", dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
