"""Run a validated config on its engine and write a run directory.

A run directory holds:

* ``config.yaml``   the resolved config (overrides applied, defaults filled in);
* ``metrics.csv``   one row per recording step (column names: :mod:`gradsparse.metrics`);
* ``summary.json``  final value of each metric, totals, steps, wall seconds;
* ``checkpoint.pt`` engine state at the end (model, memories and momentum keyed by segment, RNG,
  counters; plain tensors, loads under ``torch.load(weights_only=True)``);
* ``residual_ratio.csv`` when ``metrics.residual_ratio.steps`` is set;
* ``worker_error_norms.csv`` when ``metrics.per_worker_error_norms`` is set;
* ``stages.csv`` for stagewise learning: each stage's average w~_s and the loss there;
* PNG plots: loss vs step and vs bytes, memory norm, density (and residual ratio).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, RunConfig, dump_config
from ..divergence import NonFinite, find_nonfinite
from ..metrics import METRICS, RUNNING_MAXIMA, cumulative_metrics, eval_metrics, residual_ratio_curve, step_metrics
from .asynchronous import target_reached
from .build import build_engine, total_steps
from .rundir import RunLock, StorageError, atomic_save, atomic_write_text, clean_leftovers, storage


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}PB"


def async_summary(engine, rows: list[dict], cfg: RunConfig) -> dict:
    """What summary.json adds for the asynchronous engine (and staleness.csv / .png)."""
    hist = engine.staleness_histogram()
    total = sum(c for _, c in hist)
    return {
        "virtual_time": engine.now,
        "staleness_mean": sum(s * c for s, c in hist) / total if total else None,
        "staleness_max": max((s for s, _ in hist), default=None),
        "staleness_histogram": {str(s): c for s, c in hist},
        "rejected_messages": dict(engine.rejected),
        **engine.summary_counts(),
        **target_reached(rows, cfg.asynchronous.target),
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


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


#: paths a run directory may not be written under
_FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")
RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", "checkpoint.pt")


#: the longest file name (bytes) on the usual file systems
_NAME_MAX = 255


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def check_out_dir(path: Path, *, overwrite: bool = False, key: str = "--out") -> Path:
    """Validate where a run directory will go, before anything is written (ConfigError)."""
    text = str(path)
    if not text or "\x00" in text:
        raise ConfigError(f"{key} {text!r}: not a usable path")
    resolved = Path(os.path.abspath(path))
    if resolved.name in ("", ".", ".."):
        raise ConfigError(f"{key} {text!r}: a run directory needs a name (not the filesystem root)")
    # names longer than the filesystem's (255 bytes; the run directory's temporary sibling
    # .NAME.partial-PID needs 24 more) fail with ENAMETOOLONG even in exists()
    for part in resolved.parts:
        limit = _NAME_MAX - 24 if part is resolved.parts[-1] else _NAME_MAX
        if len(os.fsencode(part)) > limit:
            raise ConfigError(f"{key} {text[:60]!r}...: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes; "
                              f"a run directory's name is at most {_NAME_MAX - 24} bytes (a folder's {_NAME_MAX})")
    for root in _FORBIDDEN_ROOTS:
        if str(resolved) == root or str(resolved).startswith(root + "/"):
            raise ConfigError(f"{key} {text!r}: a run directory cannot be written under {root}")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ConfigError(f"{key} {text!r} exists and is not a directory")
        if is_run_dir(path):
            if not overwrite:
                raise ConfigError(
                    f"{key} {text!r} is an existing run directory; continue it with --resume {text} "
                    "or replace it with --overwrite"
                )
        elif any(path.iterdir()):  # never replaced, even with --overwrite: it is not ours
            raise ConfigError(f"{key} {text!r} is a non-empty directory that is not a run directory; "
                              "choose another --out (--overwrite replaces run directories only)")
    parent = resolved.parent
    while not parent.exists():
        if parent.is_symlink():
            raise ConfigError(f"{key} {text!r}: {parent} is a dangling link")
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key} {text!r}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {text!r}: {parent} is not writable")
    return path


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / cfg.name


def _strict_json(x):
    """NaN / inf as null, tensors and numpy scalars as numbers: valid JSON."""
    if isinstance(x, dict):
        return {str(k): _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x.tolist()
        return _strict_json(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return v if math.isfinite(v) else None


_atomic_write_text = atomic_write_text
_atomic_save = atomic_save


class StopSignals:
    """SIGINT / SIGTERM set a flag that the run checks after each step (main thread only).

    Nested: a signal the enclosing catcher took before this one was entered (a torchrun rank
    catches from its start, :mod:`gradsparse.distributed.worker`) is this one's too, so a signal
    during set-up ends the run at its first check (before step 1; the ranks of a run of several
    processes agree after step 1) instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
                outer = getattr(self._old[sig], "__self__", None)
                if isinstance(outer, StopSignals) and self.signum is None:
                    self.signum = outer.signum
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _RunState:
    """What the runner itself must carry across a resume (the engine has its own state_dict):
    the metric rows, running maxima, skipped messages, wall time, and who the run is: its run id
    (drawn when the run starts; also in config.yaml and summary.json), the resolved config the
    checkpoint was written with, and the config changes allowed on resume."""

    def __init__(self, columns) -> None:
        self.columns = list(columns)
        self.rows: list[dict] = []
        self.rr_rows: list[dict] = []
        self.worker_rows: list[dict] = []
        self.maxima: dict = {}
        self.skipped = 0
        self.wall = 0.0
        self.run_id: str = uuid.uuid4().hex
        self.config: str | None = None
        self.config_changes: list[dict] = []

    def state_dict(self) -> dict:
        return {"columns": self.columns, "rows": self.rows, "rr_rows": self.rr_rows, "worker_rows": self.worker_rows,
                "maxima": dict(self.maxima), "skipped_messages": self.skipped, "wall_seconds": self.wall,
                "run_id": self.run_id, "config": self.config, "config_changes": list(self.config_changes)}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["columns"]) != self.columns:
            raise ConfigError(f"checkpoint metric columns {sd['columns']} differ from the config's {self.columns}")
        self.rows, self.rr_rows, self.worker_rows = list(sd["rows"]), list(sd["rr_rows"]), list(sd["worker_rows"])
        self.maxima = dict(sd["maxima"])
        self.skipped, self.wall = int(sd["skipped_messages"]), float(sd["wall_seconds"])
        if sd.get("run_id"):
            self.run_id = str(sd["run_id"])
        self.config_changes = list(sd.get("config_changes") or [])


#: the first line of a run directory's config.yaml (a YAML comment: the file still loads as a config)
_CONFIG_HEADER = "# gradsparse run {run_id}: the resolved config of this run (gradsparse run --resume refuses " \
                 "an edited copy unless --allow-config-change)\n"
_RUN_ID_LINE = re.compile(r"^# gradsparse run ([0-9a-f]{32})\b")


def run_id_of_config(text: str) -> str | None:
    """The run id in a run directory's config.yaml (its first line), or None."""
    m = _RUN_ID_LINE.match(text)
    return m.group(1) if m else None


def config_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_differences(before: str, after: str) -> dict[str, list]:
    """The dotted keys whose values differ between two resolved configs: key -> [before, after]."""
    import yaml

    def flat(node, prefix=""):
        if isinstance(node, dict) and node:
            out = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
            return out
        return {prefix: node}

    a, b = flat(yaml.safe_load(before) or {}), flat(yaml.safe_load(after) or {})
    return {k: [a.get(k), b.get(k)] for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)}


def _describe_changes(changes: dict[str, list]) -> str:
    return ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items())


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
    from ..config import load_config

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
        return _resume_locked(run_dir, progress, allow_config_change, lock, load_config)
    finally:
        lock.release()


def _resume_locked(run_dir: Path, progress, allow_config_change: bool, lock, load_config) -> Path:
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
    rr = cfg.metrics.residual_ratio
    state = _RunState(columns)
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
                                  f"{_describe_changes(changes)}; restore it, or pass --allow-config-change to "
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
                  f"{_describe_changes(changes)}", file=sys.stderr)
    async_stats = None
    if engine.is_asynchronous:
        from .asynchronous import AsyncRowStats

        async_stats = AsyncRowStats(engine, names)

    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
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
        return _loop(cfg, engine, steps, names, columns, tracked, rr, state, async_stats, final, tmp, progress,
                     on_checkpoint, on_step)
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


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place (replacing an older one)."""
    with storage("the run directory", final):
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)


def _loop(cfg, engine, steps, names, columns, tracked, rr, state, async_stats, final, tmp, progress,
          on_checkpoint=None, on_step=None) -> Path:
    board = None
    if cfg.metrics.tensorboard:
        from .tensorboard import RunWriter

        board = RunWriter(tmp, state.config)
        for old in state.rows:  # a resumed run's rows go into the fresh event file first
            board.row(old, old.get("uplink_bytes") if old.get("uplink_bytes", "") != "" else None)
    show = cfg.progress if progress is None else progress
    t0 = time.perf_counter()
    wall0 = state.wall
    # the handlers are in place before metrics.csv appears: a SIGINT / SIGTERM from then on ends
    # the run as "interrupted" with its files (one between the file and step 0's row killed the
    # process and left no summary)
    with StopSignals() as signals:
        with storage("config.yaml in", tmp):
            (tmp / "config.yaml").write_text(_CONFIG_HEADER.format(run_id=state.run_id) + state.config)
            f = open(tmp / "metrics.csv", "w", newline="")
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(state.rows)

        def record(row: dict) -> None:
            if "skipped_messages" in columns:
                row["skipped_messages"] = engine.alg.skipped_messages
            full = {c: row.get(c, "") for c in columns}
            with storage("metrics.csv in", tmp):
                writer.writerow(full)
                f.flush()
            state.rows.append(full)
            if board is not None:
                board.row(full, engine.ledger.uplink_bytes)
            if cfg.metrics.per_worker_error_norms and engine.worker_state.memory is not None:
                norms = engine.worker_state.memory.flat.norm(dim=1).tolist()
                state.worker_rows.append({"step": engine.t, **{f"worker_{q}": v for q, v in enumerate(norms)}})

        def checkpoint() -> None:
            state.skipped = engine.alg.skipped_messages
            state.wall = wall0 + time.perf_counter() - t0
            # the engine's state_dict (loads with engine.load_state_dict as before) plus the runner's
            sd = {**engine.state_dict(), "runner": state.state_dict()}
            _atomic_save(sd, tmp / "checkpoint.pt")
            if on_checkpoint is not None:
                on_checkpoint(engine.t, sd)

        def finish(status: str, extra: dict | None = None) -> None:
            with storage("metrics.csv in", tmp):
                f.close()
            if board is not None:
                if async_stats is not None:
                    board.staleness("all_updates", engine.staleness_histogram(), engine.t)
                board.close()
            state.wall = wall0 + time.perf_counter() - t0
            state.skipped = engine.alg.skipped_messages
            with storage("the outputs in", tmp):
                _write_outputs(cfg, engine, columns, state, tmp, status, extra or {}, async_stats)

        try:
            return _steps(cfg, engine, steps, names, columns, tracked, rr, state, async_stats, final, tmp, show,
                          signals, record=record, checkpoint=checkpoint, finish=finish, on_step=on_step,
                          board=board)
        except StorageError as exc:
            raise _failed(exc, cfg, engine, tmp, final, finish, f) from None
        finally:
            if board is not None:
                board.close()


def _failed(exc: StorageError, cfg, engine, tmp: Path, final: Path, finish, metrics_file) -> "RunFailed":
    """A write failed mid-run: keep what can be kept. When the temporary directory holds a
    checkpoint (the last one written whole), it becomes the run directory with status
    ``failed`` (continue with --resume once the disk has room); otherwise it is removed and an
    existing run directory (a resumed run's) stays as it was."""
    message = f"{exc.strerror or exc}; the run stopped after step {engine.t}"
    at = _checkpoint_step(tmp)
    if at is None:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f"; {final} keeps its previous checkpoint" if (final / "checkpoint.pt").is_file() else \
            "; nothing was kept (no checkpoint had been written)"
        return RunFailed(message + where, final if final.is_dir() else None)
    try:
        metrics_file.close()
    except OSError:
        pass
    try:
        finish("failed", {"failed_at_step": engine.t, "checkpoint_step": at, "message": message})
    except (StorageError, OSError):
        pass  # the summary is best effort on a full disk; the checkpoint is what matters
    try:
        _install(tmp, final)
    except StorageError:
        return RunFailed(f"{message}; its last checkpoint (step {at}) is in {tmp}", tmp)
    return RunFailed(f"{message}; the run directory keeps the checkpoint of step {at} (continue with "
                     f"gradsparse run --resume {final} once there is room)", final)


def _steps(cfg, engine, steps, names, columns, tracked, rr, state, async_stats, final, tmp, show, signals, *,
           record, checkpoint, finish, on_step, board=None) -> Path:
    """The step loop of :func:`_loop` (recording rows, checkpoints, the stop rules)."""
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=engine.t, desc=cfg.name, unit="step", dynamic_ncols=True)
    maxima = state.maxima
    first_check = True
    # engines of several processes agree after every step on whether to stop (a signal or a
    # non-finite value seen by any rank), so every rank stops after the same step
    agree = engine.agree_to_stop if engine.agrees_to_stop else None
    agreed_signum = None
    # asynchronous.target.stop: end at the first recorded row that reaches the target
    stop_target = cfg.asynchronous.target if (cfg.asynchronous.target is not None and cfg.asynchronous.target.stop) else None
    stopped_at_target = False
    if not state.rows:
        record({**cumulative_metrics(engine, names), **eval_metrics(engine, names)})
    try:
        while engine.t < steps:
            if (agreed_signum if agree is not None else signals.signum) is not None:
                break
            rec = engine.step()
            done = engine.t
            if on_step is not None:
                on_step(done)
            # full scan on a run's (or resumed run's) first step: later steps may rely on
            # the memories having been finite one step before
            bad = find_nonfinite(engine, rec, done, full=first_check)
            first_check = False
            if async_stats is not None:
                async_stats.observe(rec)
            if bad is None and tracked:
                for m, value in step_metrics(engine, rec, tracked).items():
                    for name, of in RUNNING_MAXIMA.items():
                        if of == m and name in maxima and not math.isnan(value):
                            maxima[name] = max(maxima[name], value)
            if bad is None and done in rr.steps:
                G = rec.weighted_grad(engine.weights)
                ks = rr.ks or sorted({max(1, round(engine.d * (i / (rr.points - 1)) ** 2)) for i in range(rr.points)})
                for k, ratio, worst in residual_ratio_curve(G, [min(k, engine.d) for k in ks]):
                    state.rr_rows.append({"step": done, "k": k, "density": k / engine.d, "ratio": ratio, "uniform_bound": worst})
            if bad is None and (done % cfg.metrics.every == 0 or done == steps):
                row = {**cumulative_metrics(engine, names), **step_metrics(engine, rec, names), **eval_metrics(engine, names)}
                if async_stats is not None:
                    if board is not None:
                        board.staleness("since_previous_row", async_stats.staleness, done)
                    row.update(async_stats.row())
                for name in maxima:
                    row[name] = maxima[name] if maxima[name] > -math.inf else math.nan
                    maxima[name] = -math.inf
                loss = row.get("loss")
                if isinstance(loss, float) and not math.isfinite(loss):
                    bad = NonFinite("loss", done, value=loss)
                else:
                    record(row)
                    if stop_target is not None and target_reached([row], stop_target)["steps_to_target"] is not None:
                        stopped_at_target = True
                if bar is not None and bad is None:
                    post = {}
                    if "loss" in row:
                        post["loss"] = f"{row['loss']:.4g}"
                    post["bytes"] = _fmt_bytes(engine.ledger.uplink_bytes + engine.ledger.downlink_bytes)
                    bar.set_postfix(post, refresh=False)
            if bar is not None:
                bar.update(1)
            if agree is not None:
                bad, agreed_signum = agree(bad, signals.signum)
            if stopped_at_target and bad is None:
                break
            if bad is not None:
                if bar is not None:
                    bar.close()
                    bar = None
                hint = ("lower the step size, or set on_nonfinite: skip to drop non-finite worker messages"
                        if cfg.on_nonfinite == "stop" else "skipping worker messages cannot help here; lower the step size")
                message = f"{bad.describe()} (on_nonfinite: {cfg.on_nonfinite}); {hint}"
                finish("diverged", {"diverged_at_step": done, "nonfinite": {
                    "what": bad.what, "worker": bad.worker, "segment": bad.segment, "index": bad.index,
                    "value": bad.value, "step": done}, "message": message,
                    "checkpoint_step": _checkpoint_step(tmp)})
                _install(tmp, final)
                raise RunDiverged(message, final)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
                checkpoint()
    finally:
        if bar is not None:
            bar.close()
    signum = agreed_signum if agree is not None else signals.signum
    if signum is not None and engine.t < steps:
        checkpoint()
        name = signal.Signals(signum).name
        finish("interrupted", {"interrupted_at_step": engine.t, "signal": name})
        _install(tmp, final)
        raise RunInterrupted(f"interrupted by {name} after step {engine.t} of {steps}", final, signum)
    checkpoint()
    finish("completed", {"stopped_at_target": True} if stopped_at_target else None)
    if cfg.plots:
        from .plots import plot_run

        with storage("the plots in", tmp):
            plot_run(tmp)
    _install(tmp, final)
    return final


def _checkpoint_step(run_dir: Path) -> int | None:
    p = run_dir / "checkpoint.pt"
    if not p.exists():
        return None
    try:
        return int(torch.load(p, weights_only=True)["t"])
    except Exception:
        return None


def _write_outputs(cfg, engine, columns, state, run_dir: Path, status: str, extra: dict, async_stats) -> None:
    if state.rr_rows:
        _write_csv(run_dir / "residual_ratio.csv", state.rr_rows)
    if state.worker_rows:
        _write_csv(run_dir / "worker_error_norms.csv", state.worker_rows)
    stages, output = [], None
    if engine.stagewise is not None and status == "completed":
        # w~_1 .. w~_{S-1} started stages; the last stage's average w~_S is the algorithm's output
        output = engine.stagewise.output()
        averages = list(engine.stagewise.averages) + ([output] if output is not None else [])
        for s, avg in enumerate(averages, start=1):
            stages.append({"stage": s, "loss_at_average": engine.full_loss(avg)})
        if stages:
            _write_csv(run_dir / "stages.csv", stages)
    final = {}
    for c in columns:
        vals = [r[c] for r in state.rows if r[c] != ""]
        final[c] = vals[-1] if vals else None
    final_last_iterate = None
    if output is not None:  # a stagewise run's final values are those of w~_S, not of the last iterate
        final_last_iterate = dict(final)
        final["loss"] = stages[-1]["loss_at_average"]
        if "suboptimality" in final and engine.task.f_star is not None:
            final["suboptimality"] = final["loss"] - engine.task.f_star
        if "test_accuracy" in final:
            final["test_accuracy"] = engine.test_accuracy(output)
    summary = {
        "name": cfg.name,
        "status": status,
        "run_id": state.run_id,
        "config_sha256": config_sha256(state.config) if state.config is not None else None,
        "engine": engine.name,
        "algorithm": engine.alg.describe(),
        "task": engine.task.name,
        "d": engine.d,
        "workers": engine.n_workers,
        "steps": engine.t,
        "epochs": engine.epoch,
        "wall_seconds": state.wall,
        "gradient_path": engine.gradient_path,  # what "auto" resolved to
        "in_place_memory": engine.uses_in_place_memory,
        "uplink_bytes": engine.ledger.uplink_bytes,
        "downlink_bytes": engine.ledger.downlink_bytes,
        "uplink_messages": engine.ledger.uplink_messages,
        "downlink_messages": engine.ledger.downlink_messages,
        # what this process (rank 0 of a real run) handed to its transport; 0 in the simulators
        "sent_bytes": engine.ledger.sent_bytes,
        "diagnostic_bytes": engine.ledger.diagnostic_bytes,
        # what all ranks together would hand (simulators: predicted) or handed (engine torch) to
        # their transports under the collective; per rank and step below
        "collective": engine.collective,
        "all_ranks_sent_bytes": engine.ledger.all_ranks_sent_bytes,
        "sent_bytes_per_rank_step": engine.ledger.all_ranks_sent_bytes / max(engine.n_workers * engine.t, 1),
        "avg_density": engine.density_sum / max(engine.t, 1),
        "total_error": engine.total_error if engine.track_total_error else None,
        "on_nonfinite": cfg.on_nonfinite,
        "skipped_messages": state.skipped,
        "hard_threshold": engine.alg.compressor.threshold,
        "uplink_budget": engine.alg.compressor.budget_summary(engine),
        "stages": stages or None,
        "final_is": "stage_average" if output is not None else "last_iterate",
        **({"final_last_iterate": final_last_iterate} if final_last_iterate is not None else {}),
        "f_star": engine.task.f_star,
        "final": final,
        **({"config_changes": state.config_changes} if state.config_changes else {}),
        **extra,
    }
    if async_stats is not None:
        from .asynchronous import write_staleness_histogram

        write_staleness_histogram(engine, run_dir, cfg.plots and status == "completed")
        summary.update(async_summary(engine, state.rows, cfg))
    _atomic_write_text(run_dir / "summary.json", json.dumps(_strict_json(summary), indent=2, allow_nan=False))
