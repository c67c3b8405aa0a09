"""The step loop of one run: step the engine, record metric rows, write checkpoints, and end the
run as completed, diverged or interrupted.

:class:`StepLoop` holds what one run's loop works with (built by
:func:`gradsparse.experiments.runner.run` / ``resume``); :meth:`StepLoop.run` writes the run
directory's files into its temporary sibling and renames it into place. After each step ``t``:

1. ``on_step(t)``; the non-finite scan (:func:`~gradsparse.divergence.find_nonfinite`; the run's,
   or resumed run's, first step scans everything);
2. the running maxima take the step's value (``rho_hat_max`` etc., :data:`~gradsparse.metrics.RUNNING_MAXIMA`);
   ``residual_ratio.csv`` gets the curve at the steps ``metrics.residual_ratio.steps``;
3. every ``metrics.every`` steps and at the last: one row of ``metrics.csv`` (flushed), the
   running maxima reset; a non-finite loss counts as divergence; ``asynchronous.target.stop``
   ends the run at the first row that reaches the target;
4. engines of several processes agree on whether to stop (a signal or a non-finite value seen
   by any rank), so every rank stops after the same step;
5. a non-finite value ends the run: summary status ``diverged``, :class:`RunDiverged` (the last
   checkpoint, if any, stays); otherwise a checkpoint every ``checkpoint_every`` steps.

SIGINT / SIGTERM (:class:`StopSignals`) end the run after the step in progress: a checkpoint,
summary status ``interrupted``, :class:`RunInterrupted`. A write that fails
(:class:`~gradsparse.experiments.rundir.StorageError`) ends it with :class:`RunFailed`, keeping the
last checkpoint. A completed run writes its checkpoint, summary and plots.
"""

from __future__ import annotations

import csv
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, NoReturn

import torch

from ..config import RunConfig
from ..divergence import NonFinite, find_nonfinite
from ..engines.base import Engine
from ..metrics import RUNNING_MAXIMA, cumulative_metrics, eval_metrics, residual_ratio_curve, step_metrics
from .asynchronous import AsyncRowStats, target_reached
from .errors import RunDiverged, RunFailed, RunInterrupted
from .outputs import write_outputs
from .rundir import StorageError, atomic_save, install_run_dir, storage
from .run_state import CONFIG_HEADER, RunState


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


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the checkpoint in ``run_dir``, or None (none there, or unreadable)."""
    p = run_dir / "checkpoint.pt"
    if not p.exists():
        return None
    try:
        return int(torch.load(p, weights_only=True)["t"])
    except Exception:
        return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}PB"


@dataclass
class StepLoop:
    """One run's step loop and what it works with.

    ``columns`` are metrics.csv's columns (the recorded ``names`` in the order of
    :data:`~gradsparse.metrics.METRICS`); ``tracked`` the per-step metrics the running maxima
    need at every step; ``state`` the runner's resumable state (a resumed run's rows and maxima
    already in it); ``async_stats`` the asynchronous engine's per-row statistics (None for the
    others). The run is written into ``tmp`` and installed as ``final``. ``progress`` (None: the
    config's ``progress``) shows a progress bar; ``on_checkpoint(step, state)`` is called after
    each checkpoint written and ``on_step(step)`` after each step (the torch.distributed worker's
    restart checkpoints)."""

    cfg: RunConfig
    engine: Engine
    steps: int
    names: list[str]
    columns: list[str]
    tracked: set[str]
    state: RunState
    async_stats: AsyncRowStats | None
    final: Path
    tmp: Path
    progress: bool | None = None
    on_checkpoint: Callable[[int, dict], None] | None = None
    on_step: Callable[[int], None] | None = None
    # open while the loop runs (set by run())
    _metrics_file: IO[str] | None = field(default=None, init=False, repr=False)
    _writer: csv.DictWriter | None = field(default=None, init=False, repr=False)
    _board: Any = field(default=None, init=False, repr=False)
    _t0: float = field(default=0.0, init=False, repr=False)
    _wall0: float = field(default=0.0, init=False, repr=False)

    def run(self) -> Path:
        """Run the remaining steps; returns ``final`` (status ``completed``) or raises
        :class:`RunDiverged` / :class:`RunInterrupted` / :class:`RunFailed` after installing the run
        directory with that status."""
        cfg, state, tmp = self.cfg, self.state, self.tmp
        if cfg.metrics.tensorboard:
            from .tensorboard import RunWriter

            self._board = RunWriter(tmp, state.config)
            for old in state.rows:  # a resumed run's rows go into the fresh event file first
                self._board.row(old, old.get("uplink_bytes") if old.get("uplink_bytes", "") != "" else None)
        show = cfg.progress if self.progress is None else self.progress
        self._t0 = time.perf_counter()
        self._wall0 = state.wall
        # the handlers are in place before metrics.csv appears: a SIGINT / SIGTERM from then on ends
        # the run as "interrupted" with its files (one between the file and step 0's row killed the
        # process and left no summary)
        with StopSignals() as signals:
            with storage("config.yaml in", tmp):
                (tmp / "config.yaml").write_text(CONFIG_HEADER.format(run_id=state.run_id) + state.config)
                self._metrics_file = open(tmp / "metrics.csv", "w", newline="")
                self._writer = csv.DictWriter(self._metrics_file, fieldnames=self.columns)
                self._writer.writeheader()
                self._writer.writerows(state.rows)
            try:
                return self._steps(signals, show)
            except StorageError as exc:
                raise self._failed(exc) from None
            finally:
                if self._board is not None:
                    self._board.close()

    # ---- the loop ---------------------------------------------------------------------------

    def _steps(self, signals: StopSignals, show: bool) -> Path:
        """Step until ``steps`` (recording rows, checkpoints, the stop rules), then end the run."""
        cfg, engine, steps = self.cfg, self.engine, self.steps
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=engine.t, desc=cfg.name, unit="step", dynamic_ncols=True)
        first_check = True
        # engines of several processes agree after every step on whether to stop (a signal or a
        # non-finite value seen by any rank), so every rank stops after the same step
        agree = engine.agree_to_stop if engine.agrees_to_stop else None
        agreed_signum = None
        # asynchronous.target.stop: end at the first recorded row that reaches the target
        target = cfg.asynchronous.target
        stop_target = target if (target is not None and target.stop) else None
        stopped_at_target = False
        if not self.state.rows:
            self._record({**cumulative_metrics(engine, self.names), **eval_metrics(engine, self.names)})
        try:
            while engine.t < steps:
                if (agreed_signum if agree is not None else signals.signum) is not None:
                    break
                rec = engine.step()
                done = engine.t
                if self.on_step is not None:
                    self.on_step(done)
                # full scan on a run's (or resumed run's) first step: later steps may rely on
                # the memories having been finite one step before
                bad = find_nonfinite(engine, rec, done, full=first_check)
                first_check = False
                if self.async_stats is not None:
                    self.async_stats.observe(rec)
                if bad is None and self.tracked:
                    self._update_maxima(rec)
                if bad is None and done in cfg.metrics.residual_ratio.steps:
                    self._record_residual_ratio(rec, done)
                if bad is None and (done % cfg.metrics.every == 0 or done == steps):
                    row = self._metrics_row(rec, done)
                    loss = row.get("loss")
                    if isinstance(loss, float) and not math.isfinite(loss):
                        bad = NonFinite("loss", done, value=loss)
                    else:
                        self._record(row)
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
                    self._end_diverged(bad, done)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
                    self._checkpoint()
        finally:
            if bar is not None:
                bar.close()
        signum = agreed_signum if agree is not None else signals.signum
        if signum is not None and engine.t < steps:
            self._end_interrupted(signum)
        return self._end_completed(stopped_at_target)

    def _update_maxima(self, rec) -> None:
        """The running maxima take this step's values (NaN skipped)."""
        maxima = self.state.maxima
        for m, value in step_metrics(self.engine, rec, self.tracked).items():
            for name, of in RUNNING_MAXIMA.items():
                if of == m and name in maxima and not math.isnan(value):
                    maxima[name] = max(maxima[name], value)

    def _record_residual_ratio(self, rec, done: int) -> None:
        """residual_ratio.csv's rows of this step: the curve at ``metrics.residual_ratio`` k's (or
        ``points`` k's spread quadratically over 1..d)."""
        engine, rr = self.engine, self.cfg.metrics.residual_ratio
        G = rec.weighted_grad(engine.weights)
        ks = rr.ks or sorted({max(1, round(engine.d * (i / (rr.points - 1)) ** 2)) for i in range(rr.points)})
        for k, ratio, worst in residual_ratio_curve(G, [min(k, engine.d) for k in ks]):
            self.state.rr_rows.append({"step": done, "k": k, "density": k / engine.d, "ratio": ratio,
                                       "uniform_bound": worst})

    def _metrics_row(self, rec, done: int) -> dict:
        """The metrics row of step ``done`` (the running maxima reset for the next row)."""
        engine, names, maxima = self.engine, self.names, self.state.maxima
        row = {**cumulative_metrics(engine, names), **step_metrics(engine, rec, names), **eval_metrics(engine, names)}
        if self.async_stats is not None:
            if self._board is not None:
                self._board.staleness("since_previous_row", self.async_stats.staleness, done)
            row.update(self.async_stats.row())
        for name in maxima:
            row[name] = maxima[name] if maxima[name] > -math.inf else math.nan
            maxima[name] = -math.inf
        return row

    # ---- what the loop writes -----------------------------------------------------------------

    def _record(self, row: dict) -> None:
        """One row of metrics.csv (flushed), TensorBoard, and worker_error_norms.csv."""
        engine, columns = self.engine, self.columns
        if "skipped_messages" in columns:
            row["skipped_messages"] = engine.alg.skipped_messages
        full = {c: row.get(c, "") for c in columns}
        with storage("metrics.csv in", self.tmp):
            self._writer.writerow(full)
            self._metrics_file.flush()
        self.state.rows.append(full)
        if self._board is not None:
            self._board.row(full, engine.ledger.uplink_bytes)
        if self.cfg.metrics.per_worker_error_norms and engine.worker_state.memory is not None:
            norms = engine.worker_state.memory.flat.norm(dim=1).tolist()
            self.state.worker_rows.append({"step": engine.t, **{f"worker_{q}": v for q, v in enumerate(norms)}})

    def _checkpoint(self) -> None:
        engine, state = self.engine, self.state
        state.skipped = engine.alg.skipped_messages
        state.wall = self._wall0 + time.perf_counter() - self._t0
        # the engine's state_dict (loads with engine.load_state_dict as before) plus the runner's
        sd = {**engine.state_dict(), "runner": state.state_dict()}
        atomic_save(sd, self.tmp / "checkpoint.pt")
        if self.on_checkpoint is not None:
            self.on_checkpoint(engine.t, sd)

    def _finish(self, status: str, extra: dict | None = None) -> None:
        """Close metrics.csv and TensorBoard, write summary.json (``status``, ``extra``) and the
        end-of-run files."""
        engine, state = self.engine, self.state
        with storage("metrics.csv in", self.tmp):
            self._metrics_file.close()
        if self._board is not None:
            if self.async_stats is not None:
                self._board.staleness("all_updates", engine.staleness_histogram(), engine.t)
            self._board.close()
        state.wall = self._wall0 + time.perf_counter() - self._t0
        state.skipped = engine.alg.skipped_messages
        with storage("the outputs in", self.tmp):
            write_outputs(self.cfg, engine, self.columns, state, self.tmp, status, extra or {}, self.async_stats)

    # ---- how the run ends ----------------------------------------------------------------------

    def _end_diverged(self, bad: NonFinite, done: int) -> NoReturn:
        cfg = self.cfg
        hint = ("lower the step size, or set on_nonfinite: skip to drop non-finite worker messages"
                if cfg.on_nonfinite == "stop" else "skipping worker messages cannot help here; lower the step size")
        message = f"{bad.describe()} (on_nonfinite: {cfg.on_nonfinite}); {hint}"
        self._finish("diverged", {"diverged_at_step": done, "nonfinite": {
            "what": bad.what, "worker": bad.worker, "segment": bad.segment, "index": bad.index,
            "value": bad.value, "step": done}, "message": message,
            "checkpoint_step": checkpoint_step(self.tmp)})
        install_run_dir(self.tmp, self.final)
        raise RunDiverged(message, self.final)

    def _end_interrupted(self, signum: int) -> NoReturn:
        engine = self.engine
        self._checkpoint()
        name = signal.Signals(signum).name
        self._finish("interrupted", {"interrupted_at_step": engine.t, "signal": name})
        install_run_dir(self.tmp, self.final)
        raise RunInterrupted(f"interrupted by {name} after step {engine.t} of {self.steps}", self.final, signum)

    def _end_completed(self, stopped_at_target: bool) -> Path:
        self._checkpoint()
        self._finish("completed", {"stopped_at_target": True} if stopped_at_target else None)
        if self.cfg.plots:
            from .plots import plot_run

            with storage("the plots in", self.tmp):
                plot_run(self.tmp, title=self.final.name)
        install_run_dir(self.tmp, self.final)
        return self.final

    def _failed(self, exc: StorageError) -> RunFailed:
        """A write failed mid-run: keep what can be kept. When the temporary directory holds a
        checkpoint (the last one written whole), it becomes the run directory with status
        ``failed`` (continue with --resume once the disk has room); otherwise it is removed and an
        existing run directory (a resumed run's) stays as it was."""
        engine, tmp, final = self.engine, self.tmp, self.final
        message = f"{exc.strerror or exc}; the run stopped after step {engine.t}"
        at = checkpoint_step(tmp)
        if at is None:
            shutil.rmtree(tmp, ignore_errors=True)
            where = f"; {final} keeps its previous checkpoint" if (final / "checkpoint.pt").is_file() else \
                "; nothing was kept (no checkpoint had been written)"
            return RunFailed(message + where, final if final.is_dir() else None)
        try:
            self._metrics_file.close()
        except OSError:
            pass
        try:
            self._finish("failed", {"failed_at_step": engine.t, "checkpoint_step": at, "message": message})
        except (StorageError, OSError):
            pass  # the summary is best effort on a full disk; the checkpoint is what matters
        try:
            install_run_dir(tmp, final)
        except StorageError:
            return RunFailed(f"{message}; its last checkpoint (step {at}) is in {tmp}", tmp)
        return RunFailed(f"{message}; the run directory keeps the checkpoint of step {at} (continue with "
                         f"gradsparse run --resume {final} once there is room)", final)
