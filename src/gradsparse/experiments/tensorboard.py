"""TensorBoard output: a run's metrics, staleness and config as event files, and the DDP hook's
bytes per step.

``metrics.tensorboard: true`` (or ``gradsparse run|sweep|launch --tensorboard``) makes the runner
write, with ``torch.utils.tensorboard`` (the ``tensorboard`` package: ``pip install
'gradsparse[tensorboard]'``), event files into the run directory:

* every recorded metric column at every recorded row, twice: ``METRIC/by_step`` (x = step) and
  ``METRIC/by_uplink_bytes`` (x = the cumulative uplink bytes of the ledger at that row: "loss
  against data sent", the papers' axis);
* for the asynchronous engines, ``staleness/since_previous_row`` (a histogram, one bucket per
  staleness value, of the updates applied since the previous row) and, at the end,
  ``staleness/all_updates`` (the whole run's histogram, the same counts as ``summary.json``'s
  ``staleness_histogram``);
* the resolved config as text (``config``).

``tensorboard --logdir runs/`` then shows every run by its directory name (a sweep: every grid
point). While a run is under way its directory is the hidden ``.NAME.partial-PID`` beside the
final one (runs are renamed into place when they end). A resumed run writes all its rows again
into a fresh event file (the run directory is rewritten as a whole).

:class:`HookLogger` logs the DDP communication hook's byte counters per step into any
``SummaryWriter`` (see the README, "TensorBoard").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["require_tensorboard", "RunWriter", "HookLogger", "hook_counters", "staleness_buckets", "read_scalars"]

#: seconds between flushes of the event file while a run is under way
FLUSH_SECONDS = 5


def require_tensorboard(key: str = "tensorboard") -> None:
    """Raise ConfigError (one line) when ``torch.utils.tensorboard`` cannot be used."""
    from ..config import ConfigError

    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{key}: TensorBoard output needs the tensorboard package ({exc}); install it with "
                          "pip install 'gradsparse[tensorboard]' (or pip install tensorboard)") from None


def staleness_buckets(counts: dict[int, int] | list[tuple[int, int]]) -> dict[str, Any]:
    """The histogram of integer staleness values as ``add_histogram_raw`` arguments: one bucket
    per value from the smallest to the largest, bucket s covering (s - 0.5, s + 0.5]."""
    counts = dict(counts)
    lo, hi = min(counts), max(counts)
    values = range(lo, hi + 1)
    num = sum(counts.values())
    return dict(min=float(lo), max=float(hi), num=num,
                sum=float(sum(s * c for s, c in counts.items())),
                sum_squares=float(sum(s * s * c for s, c in counts.items())),
                bucket_limits=[s + 0.5 for s in values], bucket_counts=[counts.get(s, 0) for s in values])


def _number(value) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class RunWriter:
    """The runner's event-file writer for one run directory (see the module docstring)."""

    def __init__(self, run_dir: Path, config_text: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=FLUSH_SECONDS)
        self.writer.add_text("config", "```yaml\n" + config_text + "```", global_step=0)
        self.closed = False

    def row(self, row: dict, uplink_bytes: int | None) -> None:
        """One recorded row: every column against step and against ``uplink_bytes`` (skipped
        when None, e.g. a resumed row of a run that does not record uplink_bytes)."""
        step = int(row["step"])
        for column, value in row.items():
            x = _number(value)
            if column == "step" or x is None:
                continue
            self.writer.add_scalar(f"{column}/by_step", x, global_step=step)
            if uplink_bytes is not None and column != "uplink_bytes":
                self.writer.add_scalar(f"{column}/by_uplink_bytes", x, global_step=int(uplink_bytes))

    def staleness(self, tag: str, values_or_counts, step: int) -> None:
        """A histogram of staleness values (a list of values or (value, count) pairs)."""
        if not values_or_counts:
            return
        if isinstance(values_or_counts[0], (tuple, list)):
            counts = {int(s): int(c) for s, c in values_or_counts}
        else:
            counts: dict[int, int] = {}
            for s in values_or_counts:
                counts[int(s)] = counts.get(int(s), 0) + 1
        self.writer.add_histogram_raw(f"staleness/{tag}", global_step=int(step), **staleness_buckets(counts))

    def close(self) -> None:
        if not self.closed:
            self.writer.close()
            self.closed = True


def _counter(state, name: str) -> int | None:
    """``state.ledger.NAME`` (the hook's byte ledger) or ``state.NAME``; None when neither exists."""
    ledger = getattr(state, "ledger", None)
    value = getattr(ledger, name, None) if ledger is not None else None
    if value is None:
        value = getattr(state, name, None)
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def hook_counters(state) -> dict[str, int]:
    """The DDP hook state's byte counters that exist (see :class:`HookLogger`)."""
    return {name: v for name in HookLogger.COUNTERS if (v := _counter(state, name)) is not None}


class HookLogger:
    """The DDP hook's bytes per step in TensorBoard.

        state = gradsparse.ddp.SparsifiedState(model, alg, lr=0.1)
        model.register_comm_hook(state, gradsparse.ddp.hook)
        log = HookLogger(state, SummaryWriter("runs/tb/rank0"))
        for x, y in loader:
            ...; opt.step(); log.log()

    Each :meth:`log` writes, at x = the hook's step counter (``state.step``; or the number of
    :meth:`log` calls when the state has none), ``hook/uplink_bytes`` (cumulative: the exact
    wire size of what this rank sent) and ``hook/uplink_bytes_per_step`` (since the previous
    call, divided by the steps in between), and the same for ``sent_bytes`` (what this rank put
    on the collectives) when the state counts it. The counters are read from ``state.ledger``
    when the state has one, else from the state itself; a counter that is absent is skipped.
    Returns the values written."""

    COUNTERS = ("uplink_bytes", "sent_bytes")

    def __init__(self, state, writer=None, *, log_dir: str | Path | None = None, prefix: str = "hook") -> None:
        if writer is None:
            if log_dir is None:
                raise ValueError("HookLogger needs a SummaryWriter or log_dir")
            require_tensorboard("HookLogger")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir), flush_secs=FLUSH_SECONDS)
        self.state, self.writer, self.prefix = state, writer, prefix
        self.calls = 0
        self._last_step: int | None = None
        self._last: dict[str, int] = {}
        for name in self.COUNTERS:
            value = _counter(state, name)
            if value is not None:
                self._last[name] = value
        self._last_step = self._step()

    def _step(self) -> int:
        step = getattr(self.state, "step", None)
        if isinstance(step, bool) or step is None:
            return self.calls
        try:
            return int(step)
        except (TypeError, ValueError):
            return self.calls

    def log(self) -> dict[str, float]:
        self.calls += 1
        step = self._step()
        steps = max(step - (self._last_step or 0), 1) if self._last_step is not None else 1
        written: dict[str, float] = {}
        for name in self.COUNTERS:
            value = _counter(self.state, name)
            if value is None:
                continue
            per_step = (value - self._last.get(name, 0)) / steps
            self.writer.add_scalar(f"{self.prefix}/{name}", value, global_step=step)
            self.writer.add_scalar(f"{self.prefix}/{name}_per_step", per_step, global_step=step)
            written[name], written[f"{name}_per_step"] = float(value), float(per_step)
            self._last[name] = value
        self._last_step = step
        return written

    def close(self) -> None:
        self.writer.close()


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of ``run_dir`` (tag -> [(step, value)]), read
    back with tensorboard's own event reader (for tests and scripts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
