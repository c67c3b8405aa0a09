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
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from ..algorithm import Algorithm
from ..compressors import make_compressor
from ..config import ConfigError, RunConfig, dump_config
from ..divergence import NonFinite, find_nonfinite
from ..engines import ENGINES
from ..metrics import METRICS, RUNNING_MAXIMA, cumulative_metrics, eval_metrics, residual_ratio_curve, step_metrics
from ..resources import machine_memory
from ..schedules import Schedule
from ..segments import Layout
from ..staleness import StalenessDampening
from ..tasks import UserTaskError, make_task
from .asynchronous import target_reached


def build_task(cfg: RunConfig):
    """The config's task (built-in or the user's own); any problem is one ConfigError line."""
    try:
        return make_task(cfg.task.name, seed=cfg.seed, **cfg.task.options)
    except UserTaskError as exc:
        raise ConfigError(f"config key 'task.name': {exc}") from None
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"config key 'task': {exc}") from None
    except MemoryError as exc:  # e.g. linreg with a huge n_features: the data alone cannot be allocated
        raise ConfigError(f"config key 'task.options': building task {cfg.task.name!r} ran out of memory "
                          f"({' '.join(str(exc).split())[:160]}); make the task smaller") from None


def build_algorithm(cfg: RunConfig, layout: Layout, base_lr: float) -> Algorithm:
    """Each component built from its own config section (see :mod:`gradsparse.config`)."""
    a = cfg.algorithm

    def compressor(key: str, section):
        try:
            return make_compressor(section.kind, layout, base_lr, **section.options())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"config key 'algorithm.{key}': {exc}") from None

    up = compressor("compressor", a.compressor)
    down = None
    if a.topology.down_compressor is not None:
        down = compressor("topology.down_compressor", a.topology.down_compressor)
    try:
        return Algorithm(
            compressor=up,
            feedback=a.feedback,
            momentum=a.momentum.build(),
            topology=a.topology.kind,
            down_compressor=down,
            weight_decay=a.weight_decay,
            value_dtype=cfg.value_dtype,
            staleness=StalenessDampening(a.staleness.kind, a.staleness.beta),
            on_nonfinite=cfg.on_nonfinite,
        )
    except ValueError as exc:
        raise ConfigError(f"config key 'algorithm': {exc}") from None


def build_schedule(cfg: RunConfig, task) -> Schedule:
    s = cfg.schedule
    lr = s.lr
    if lr == "1/L":
        if "L" not in task.info:
            raise ConfigError(f"config key 'schedule.lr': '1/L' needs a task that knows L; {task.name!r} does not")
        lr = 1.0 / task.info["L"]
    try:
        return Schedule(
            kind=s.kind, lr=float(lr), milestones=s.milestones, warmup_epochs=s.warmup_epochs,
            warmup_start=s.warmup_start, power=s.power, beta=s.beta, mu=s.mu,
            stage_steps=s.stage_steps, prox_gamma=s.prox_gamma,
        )
    except ValueError as exc:
        raise ConfigError(f"config key 'schedule': {exc}") from None


def asynchronous_options(cfg: RunConfig) -> dict:
    """The ``asynchronous`` config section as the asynchronous engine's keyword arguments."""
    from ..engines.async_sim import ComputeLaw, KardamFilter, NetworkLaw

    a = cfg.asynchronous
    try:
        return dict(
            compute=ComputeLaw(**a.compute.model_dump()), network=NetworkLaw(**a.network.model_dump()),
            server_time=a.server_time, staleness_bound=a.staleness_bound, drop_older_than=a.drop_older_than,
            kardam=KardamFilter(**a.kardam.model_dump()), update_cosine=a.update_cosine,
        )
    except ValueError as exc:
        raise ConfigError(f"config key 'asynchronous': {exc}") from None


def build_engine(cfg: RunConfig, engine_class=None):
    """Everything that can reject the config happens here, before any file is written.

    ``engine_class`` (default ``ENGINES[cfg.engine]``) lets ``gradsparse launch`` build, in its
    own process and without a process group, a stand-in that runs every check a rank of the
    torch engines would run (:mod:`gradsparse.distributed.launch`)."""
    task = build_task(cfg)
    layout = Layout.of(task.init_params(torch.Generator().manual_seed(cfg.seed)))
    sched = build_schedule(cfg, task)
    alg = build_algorithm(cfg, layout, sched.lr)
    check_memory(cfg, task, layout, alg)
    w = cfg.workers
    kwargs = dict(
        n_workers=w.count, batch_size=w.batch_size, split=w.split, shards_per_worker=w.shards_per_worker,
        sampling=w.sampling, n_shards=w.n_shards,
        weights=w.weights, seed=cfg.seed, gradient_shift=cfg.algorithm.gradient_shift,
    )
    if cfg.engine in ("sync", "loop", "torch"):
        kwargs.update(collective=cfg.collective)
    if cfg.engine == "sync":
        kwargs.update(gradient_path=cfg.simulator.gradient_path, in_place_memory=cfg.simulator.in_place_memory)
    if cfg.engine in ("async", "torch_async"):
        kwargs.update(asynchronous_options(cfg))
    try:
        engine = (engine_class or ENGINES[cfg.engine])(task, alg, sched, **kwargs)
    except ValueError as exc:
        key = "simulator.gradient_path" if "gradient_path" in str(exc) else "workers"
        if "collective" in str(exc):
            key = "collective"
        if cfg.engine in ("async", "torch_async"):
            key = "engine"
        raise ConfigError(f"config key '{key}': {exc}") from None
    if alg.topology.kind not in engine.topologies:
        raise ConfigError(f"config key 'engine': engine {cfg.engine!r} does not run topology {alg.topology.kind!r}")
    if hasattr(engine, "bind_total_steps"):  # torch_async: the server stops the workers after the last update
        engine.bind_total_steps(total_steps(cfg, engine))
    # a compressor that plans over the run (budget_threshold) learns the run's length here
    if alg.down_compressor is not None and hasattr(alg.down_compressor, "bind_run"):
        raise ConfigError("config key 'algorithm.topology.down_compressor': budget_threshold keeps per-worker "
                          "state and is an uplink compressor (algorithm.compressor)")
    if hasattr(alg.compressor, "bind_run"):
        try:
            alg.compressor.bind_run(total_steps(cfg, engine), cfg.value_dtype)
        except ValueError as exc:
            raise ConfigError(f"config key 'algorithm.compressor': {exc}") from None
    # dry run of the compressors on the real dimension (e.g. k > d is caught here)
    for key, comp in (("compressor", alg.compressor), ("topology.down_compressor", alg.down_compressor)):
        if comp is None:
            continue
        try:
            comp.compress(torch.zeros(1, engine.d, dtype=engine.dtype))
        except ValueError as exc:
            raise ConfigError(f"config key 'algorithm.{key}': {exc} (the model has d = {engine.d})") from None
    if alg.feedback.kind == "ef-scaled":
        per_step = engine.data.samples_per_step()

        def epoch_of(t: int) -> float:
            return t * per_step / max(task.n_train, 1)

        bad = sched.first_nonpositive(total_steps(cfg, engine), epoch_of)
        if bad is not None:
            raise ConfigError(
                f"config key 'schedule': feedback ef-scaled divides by the step size, which this schedule "
                f"makes {sched(bad, epoch_of(bad))!r} at step {bad} (e.g. a warm-up from warmup_start = 0); "
                "use feedback ef or a schedule that stays positive"
            )
    return engine


def total_steps(cfg: RunConfig, engine) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * engine.task.n_train / engine.data.samples_per_step()))


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
        **({"drained_messages": engine.drained_messages} if hasattr(engine, "drained_messages") else {}),
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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Signals:
    """SIGINT / SIGTERM set a flag that the run checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def estimate_memory(cfg: RunConfig, task, layout: Layout, alg: Algorithm) -> tuple[int, str]:
    """Bytes a run needs, roughly: N x d x bytes x state tensors (gradients, accumulated buffer,
    memory, momentum) + the data set + the batches; and how it was computed."""
    w = cfg.workers
    n, d = w.count, layout.d
    elem = torch.empty(0, dtype=next(iter(task.init_params(torch.Generator().manual_seed(0)).values())).dtype).element_size()
    tensors = 2 + int(alg.feedback.has_memory) + 2 * int(alg.momentum.side == "worker")
    state = n * d * elem * tensors
    data = 0
    for name in ("train_x", "train_y", "test_x", "test_y"):
        x = getattr(task, name, None)
        if isinstance(x, torch.Tensor):
            data += x.numel() * x.element_size()
    n_train = max(task.n_train, 1)
    row = (task.train_x.numel() * task.train_x.element_size() + task.train_y.numel() * task.train_y.element_size()) // n_train
    per_step = n_train if w.batch_size == "full" else n * int(w.batch_size)
    # gathered rows and their indices, plus per-sample intermediates of up to d values
    batch = per_step * (2 * row + 16 + d * elem)
    total = state + data + batch
    how = (f"{n} workers x d = {d} x {elem} bytes x {tensors} state tensors = {_gib(state)} + data {_gib(data)} "
           f"+ batches of {per_step} rows x (row + d values) {_gib(batch)}")
    return total, how


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_memory(cfg: RunConfig, task, layout: Layout, alg: Algorithm) -> None:
    if not cfg.memory_check:
        return
    need, how = estimate_memory(cfg, task, layout, alg)
    if cfg.memory_limit_gb is not None:
        limit, source = int(cfg.memory_limit_gb * 2**30), "memory_limit_gb"
    else:
        limit, source = machine_memory()
    if limit is not None and need > limit:
        key = "workers.batch_size" if "batches" in how and cfg.workers.batch_size != "full" and \
            cfg.workers.count * int(cfg.workers.batch_size) > 10 * max(task.n_train, 1) else "workers.count"
        raise ConfigError(
            f"config key '{key}': the run needs an estimated {_gib(need)} ({how}), more than the limit "
            f"{_gib(limit)} ({source}); use fewer workers or a smaller model/batch, or override with "
            "memory_limit_gb: <GiB> or memory_check: false (--no-memory-check)"
        )


class _RunState:
    """What the runner itself must carry across a resume (the engine has its own state_dict)."""

    def __init__(self, columns) -> None:
        self.columns = list(columns)
        self.rows: list[dict] = []
        self.rr_rows: list[dict] = []
        self.worker_rows: list[dict] = []
        self.maxima: dict = {}
        self.skipped = 0
        self.wall = 0.0

    def state_dict(self) -> dict:
        return {"columns": self.columns, "rows": self.rows, "rr_rows": self.rr_rows, "worker_rows": self.worker_rows,
                "maxima": dict(self.maxima), "skipped_messages": self.skipped, "wall_seconds": self.wall}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["columns"]) != self.columns:
            raise ConfigError(f"checkpoint metric columns {sd['columns']} differ from the config's {self.columns}")
        self.rows, self.rr_rows, self.worker_rows = list(sd["rows"]), list(sd["rr_rows"]), list(sd["worker_rows"])
        self.maxima = dict(sd["maxima"])
        self.skipped, self.wall = int(sd["skipped_messages"]), float(sd["wall_seconds"])


def run(cfg: RunConfig, out: str | Path | None = None, *, progress: bool | None = None,
        overwrite: bool = False, resume_state: dict | None = None,
        on_checkpoint: Callable[[int, dict], None] | None = None,
        on_step: Callable[[int], None] | None = None) -> Path:
    """Run ``cfg``; returns the run directory (status ``completed``). Raises ConfigError before
    anything is written, :class:`RunDiverged` / :class:`RunInterrupted` after writing the run
    directory with that status. The directory is written into a temporary sibling and renamed
    into place, so it is whole or absent.

    For the torch.distributed worker (:mod:`gradsparse.distributed.restart`): ``resume_state``
    (a ``checkpoint.pt`` dict) starts the run from that state; ``on_checkpoint(step, state)`` is
    called after each checkpoint the run writes; ``on_step(step)`` after each step."""
    if out is not None and not str(out).strip():
        raise ConfigError("--out '': an empty path; give a directory for the run")
    final = Path(out) if out is not None else default_out(cfg)
    check_out_dir(final, overwrite=overwrite)
    return _execute(cfg, final, progress=progress, resume=resume_state, on_checkpoint=on_checkpoint, on_step=on_step)


def resume(run_dir: str | Path, *, progress: bool | None = None) -> Path:
    """Continue the run in ``run_dir`` from its checkpoint: the same metrics.csv and final state
    as the uninterrupted run, bitwise."""
    from ..config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        from ..distributed.restart import restart_dir

        if (restart_dir(run_dir) / "manifest.json").is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: a stopped engine 'torch' run (only its restart checkpoints "
                              f"exist): continue it with gradsparse launch --resume {run_dir}")
        raise ConfigError(f"--resume {str(run_dir)!r}: not a directory")
    for f in ("config.yaml", "checkpoint.pt"):
        if not (run_dir / f).is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: no {f} (is it a run directory with a checkpoint?)")
    status = None
    if (run_dir / "summary.json").is_file():
        try:
            status = json.loads((run_dir / "summary.json").read_text()).get("status")
        except (ValueError, OSError, AttributeError):
            status = None
    if status == "completed":
        raise ConfigError(f"--resume {str(run_dir)!r}: the run is already completed")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.engine == "torch":
        raise ConfigError(f"--resume {str(run_dir)!r}: an engine 'torch' run continues under torchrun from its "
                          f"per-rank restart checkpoints: gradsparse launch --resume {run_dir}")
    if cfg.engine == "torch_async":
        raise ConfigError(f"--resume {str(run_dir)!r}: an engine 'torch_async' run keeps no restart checkpoints "
                          "(real timing makes it unrepeatable); start it again")
    check_out_dir(run_dir, overwrite=True, key="--resume")
    try:
        sd = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"--resume {str(run_dir)!r}: checkpoint.pt cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(sd, dict) or "runner" not in sd:
        raise ConfigError(f"--resume {str(run_dir)!r}: checkpoint.pt holds no runner state (written by an older version?)")
    return _execute(cfg, run_dir, progress=progress, resume=sd)


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
             on_checkpoint=None, on_step=None) -> Path:
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
    if resume is not None:
        try:
            engine.load_state_dict({k: v for k, v in resume.items() if k != "runner"})
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"--resume {str(final)!r}: checkpoint does not fit the run's config: {exc}") from None
        state.load_state_dict(resume["runner"])
        engine.alg.skipped_messages = state.skipped
    is_async = hasattr(engine, "staleness_histogram")
    async_stats = None
    if is_async:
        from .asynchronous import AsyncRowStats

        async_stats = AsyncRowStats(engine, names)

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        return _loop(cfg, engine, steps, names, columns, tracked, rr, state, async_stats, final, tmp, progress,
                     on_checkpoint, on_step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place (replacing an older one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _loop(cfg, engine, steps, names, columns, tracked, rr, state, async_stats, final, tmp, progress,
          on_checkpoint=None, on_step=None) -> Path:
    board = None
    if cfg.metrics.tensorboard:
        from .tensorboard import RunWriter

        board = RunWriter(tmp, dump_config(cfg))
        for old in state.rows:  # a resumed run's rows go into the fresh event file first
            board.row(old, old.get("uplink_bytes") if old.get("uplink_bytes", "") != "" else None)
    try:
        return _loop_body(cfg, engine, steps, names, columns, tracked, rr, state, async_stats, final, tmp,
                          progress, on_checkpoint, on_step, board)
    finally:
        if board is not None:
            board.close()


def _loop_body(cfg, engine, steps, names, columns, tracked, rr, state, async_stats, final, tmp, progress,
               on_checkpoint, on_step, board) -> Path:
    (tmp / "config.yaml").write_text(dump_config(cfg))
    show = cfg.progress if progress is None else progress
    t0 = time.perf_counter()
    wall0 = state.wall
    f = open(tmp / "metrics.csv", "w", newline="")
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(state.rows)

    def record(row: dict) -> None:
        if "skipped_messages" in columns:
            row["skipped_messages"] = engine.alg.skipped_messages
        full = {c: row.get(c, "") for c in columns}
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
        f.close()
        if board is not None:
            if async_stats is not None:
                board.staleness("all_updates", engine.staleness_histogram(), engine.t)
            board.close()
        state.wall = wall0 + time.perf_counter() - t0
        state.skipped = engine.alg.skipped_messages
        _write_outputs(cfg, engine, columns, state, tmp, status, extra or {}, async_stats)

    if not state.rows:
        record({**cumulative_metrics(engine, names), **eval_metrics(engine, names)})
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=engine.t, desc=cfg.name, unit="step", dynamic_ncols=True)
    maxima = state.maxima
    first_check = True
    # engines of several processes agree after every step on whether to stop (a signal or a
    # non-finite value seen by any rank), so every rank stops after the same step
    agree = getattr(engine, "agree_to_stop", None)
    agreed_signum = None
    with _Signals() as signals:
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
    finish("completed")
    if cfg.plots:
        from .plots import plot_run

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
    stages = []
    if getattr(engine, "stagewise", None) is not None and status == "completed":
        for s, avg in enumerate(engine.stagewise.averages, start=1):
            stages.append({"stage": s, "loss_at_average": engine.full_loss(avg)})
        if stages:
            _write_csv(run_dir / "stages.csv", stages)
    final = {}
    for c in columns:
        vals = [r[c] for r in state.rows if r[c] != ""]
        final[c] = vals[-1] if vals else None
    summary = {
        "name": cfg.name,
        "status": status,
        "engine": engine.name,
        "algorithm": engine.alg.describe(),
        "task": engine.task.name,
        "d": engine.d,
        "workers": engine.n_workers,
        "steps": engine.t,
        "epochs": engine.epoch,
        "wall_seconds": state.wall,
        "gradient_path": getattr(engine, "gradient_path", None),  # what "auto" resolved to
        "in_place_memory": getattr(engine, "uses_in_place_memory", False),
        "uplink_bytes": engine.ledger.uplink_bytes,
        "downlink_bytes": engine.ledger.downlink_bytes,
        "uplink_messages": engine.ledger.uplink_messages,
        "downlink_messages": engine.ledger.downlink_messages,
        # what this process (rank 0 of a real run) handed to its transport; 0 in the simulators
        "sent_bytes": engine.ledger.sent_bytes,
        "diagnostic_bytes": engine.ledger.diagnostic_bytes,
        # what all ranks together would hand (simulators: predicted) or handed (engine torch) to
        # their transports under the collective; per rank and step below
        "collective": getattr(engine, "collective", None),
        "all_ranks_sent_bytes": engine.ledger.all_ranks_sent_bytes,
        "sent_bytes_per_rank_step": engine.ledger.all_ranks_sent_bytes / max(engine.n_workers * engine.t, 1),
        "avg_density": engine.density_sum / max(engine.t, 1),
        "total_error": engine.total_error if engine.track_total_error else None,
        "on_nonfinite": cfg.on_nonfinite,
        "skipped_messages": state.skipped,
        "hard_threshold": getattr(engine.alg.compressor, "threshold", None),
        "uplink_budget": getattr(engine.alg.compressor, "budget_summary", lambda e: None)(engine),
        "stages": stages or None,
        "f_star": engine.task.f_star,
        "final": final,
        **extra,
    }
    if async_stats is not None:
        from .asynchronous import write_staleness_histogram

        write_staleness_histogram(engine, run_dir, cfg.plots and status == "completed")
        summary.update(async_summary(engine, state.rows, cfg))
    _atomic_write_text(run_dir / "summary.json", json.dumps(_strict_json(summary), indent=2, allow_nan=False))
