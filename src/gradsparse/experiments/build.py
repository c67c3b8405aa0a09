"""A config, built: its task, algorithm, schedule and engine, with every check a run makes
before its first step (the launcher's preflight builds the same way)."""

from __future__ import annotations

import math

import torch

from ..algorithm import Algorithm
from ..compressors import make_compressor
from ..config import ConfigError, RunConfig
from ..engines import ENGINES
from ..schedules import Schedule
from ..segments import Layout
from ..staleness import StalenessDampening
from ..tasks import UserTaskError, make_task
from .memory_estimate import check_memory, check_memory_before_task


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
    check_memory_before_task(cfg)  # a run too large for the machine is refused before its task is built
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
    engine.bind_total_steps(total_steps(cfg, engine))
    if cfg.engine == "async":  # a virtual clock that stays finite
        try:
            engine.check_horizon(total_steps(cfg, engine))
        except ValueError as exc:
            raise ConfigError(f"config key 'asynchronous': {exc}") from None
    # a compressor that plans over the run (budget_threshold) learns the run's length here
    if alg.down_compressor is not None and alg.down_compressor.plans_over_run:
        raise ConfigError("config key 'algorithm.topology.down_compressor': budget_threshold keeps per-worker "
                          "state and is an uplink compressor (algorithm.compressor)")
    if alg.compressor.plans_over_run:
        worker_steps = reserve = None
        if cfg.engine == "async":  # steps counts server updates: each worker plans over its own messages
            try:
                worker_steps = engine.planned_messages(total_steps(cfg, engine), _planned_message_nbytes(cfg, engine))
            except ValueError as exc:
                raise ConfigError(f"config key 'algorithm.compressor': {alg.compressor.kind} on engine async plans "
                                  f"each worker's budget over its messages, but {exc}") from None
            # with bandwidth the plan assumed the messages' sizes: keep an empty frame back for a
            # few more messages per worker (2% + 1), so the budget holds if the trace differs
            reserve = [math.ceil(0.02 * t) + 1 for t in worker_steps] if engine.network.bandwidth is not None else None
        try:
            alg.compressor.bind_run(total_steps(cfg, engine), cfg.value_dtype, worker_steps=worker_steps,
                                    reserve_messages=reserve if worker_steps is not None else None)
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


def _planned_message_nbytes(cfg: RunConfig, engine) -> int | None:
    """The message size the asynchronous plan assumes when the network time depends on it
    (``bandwidth``): an even share of the budget over a worker's share of the updates."""
    if engine.network.bandwidth is None:
        return None
    comp = engine.alg.compressor
    empty, dense = comp._sizes(engine.d)
    if comp.bytes_mode:
        share = comp.budget_bytes * engine.n_workers / max(total_steps(cfg, engine), 1)
    else:
        share = empty + comp.density * engine.d * (4 + comp.value_bytes)
    return int(min(max(share, empty), dense))


def total_steps(cfg: RunConfig, engine) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * engine.task.n_train / engine.data.samples_per_step()))
