"""The up-front memory estimate: what a run will hold at its peak (its [N, d] tensors, batches
and intermediate values), checked against the machine's memory before anything is built."""

from __future__ import annotations

import torch

from ..algorithm import Algorithm
from ..config import ConfigError, RunConfig
from ..resources import machine_memory, process_memory
from ..segments import Layout
from ..tasks import task_dimension


#: what a run allocates besides its [N, d] tensors and batches: the first step's libraries,
#: allocator slack, buffers of the metrics (measured: 0.1 - 0.2 GiB)
RUN_OVERHEAD_BYTES = 150 << 20


def state_tensors(cfg: RunConfig) -> tuple[float, str]:
    """How many [N, d] tensors of the task's dtype a step holds at its peak, and which: the
    per-worker gradients, the accumulated buffer and the compressor's per-step temporaries
    (measured: 5 with identity and no memory), one memory (ef, ef-scaled, memory), two for
    worker momentum (buffer and its update), two for ef-scaled (p / gamma and its image), the
    workers' model copies of the loop (3) and asynchronous (1) engines, and 5 for top-k when the
    compiled kernel is missing (``torch.topk``'s buffers). Measured against peak
    RSS (README "Memory estimate"), on the vectorized and loop engines, for identity, top-k,
    hard-threshold, ef / memory / ef-scaled and momentum."""
    a = cfg.algorithm
    parts = [(5.0, "gradients + step buffers")]
    if a.feedback != "none":
        parts.append((1.0, "memory"))
    if a.momentum.kind == "update":
        parts.append((2.0, "momentum"))
    if a.feedback == "ef-scaled":
        parts.append((2.0, "ef-scaled buffers"))
    if cfg.engine == "loop":
        parts.append((3.0, "model copies"))
    elif cfg.engine in ("async", "torch_async"):
        parts.append((1.0, "worker models"))
    from ..kernels import has_extension

    if a.compressor.kind == "topk" and not has_extension():
        parts.append((5.0, "pure-torch top-k"))  # no compiled kernel: torch.topk's buffers
    return sum(c for c, _ in parts), " + ".join(f"{c:g} {what}" for c, what in parts)


def _samples_per_step(cfg: RunConfig, n_train: int | None) -> int:
    w = cfg.workers
    if w.batch_size == "full":
        return n_train if n_train is not None else 0
    return w.count * int(w.batch_size)


def estimate_memory_before_task(cfg: RunConfig) -> tuple[int, str] | None:
    """A lower bound of :func:`estimate_memory` from the config alone, for the tasks whose d
    their options fix (:func:`gradsparse.tasks.task_dimension`): this process's memory now
    plus the run's [N, d] tensors (no data, no batches). None when d is not known yet. It lets a
    run that cannot fit be refused before its task is built (which can take minutes and GiBs)."""
    dim = task_dimension(cfg.task.name, cfg.task.options)
    if dim is None:
        return None
    d, elem = dim
    n = cfg.workers.count
    tensors, which = state_tensors(cfg)
    now, _ = process_memory()
    state = int(n * d * elem * tensors)
    how = (f"{n} workers x d = {d} x {elem} bytes x {tensors:g} tensors ({which}) = {_gib(state)} + this process "
           f"{_gib(now)} + {_gib(RUN_OVERHEAD_BYTES)} overhead; the data not counted yet")
    return now + state + RUN_OVERHEAD_BYTES, how


def _intermediate_values(task, rows: int) -> int:
    """Values the task's loss creates on ``rows`` training rows (outputs of every torch call that
    are new tensors, not views of an input), counted under a TorchFunctionMode."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        total = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = set()

            def storages(x, into):
                if isinstance(x, torch.Tensor):
                    try:
                        into.add(x.untyped_storage().data_ptr())
                    except (RuntimeError, NotImplementedError):
                        pass
                elif isinstance(x, (list, tuple)):
                    for y in x:
                        storages(y, into)
                elif isinstance(x, dict):
                    for y in x.values():
                        storages(y, into)

            storages(args, inputs)
            storages(kwargs or {}, inputs)
            outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)] \
                if isinstance(out, (list, tuple)) else []
            for o in outs:
                mine: set = set()
                storages(o, mine)
                if not mine & inputs:
                    Count.total += o.numel()
            return out

    params = task.init_params(torch.Generator().manual_seed(0))
    with torch.no_grad(), Count():
        task.loss(params, task.train_x[:rows], task.train_y[:rows])
    return Count.total


def _values_per_sample(task) -> int:
    """What one more training row adds to the loss's intermediate values (the difference between
    two rows and one: parameter-sized work that does not grow with the batch is not counted);
    0 when the probe fails (the estimate then counts the rows themselves only)."""
    if task.n_train < 2:
        return 0
    try:
        return max(0, _intermediate_values(task, 2) - _intermediate_values(task, 1))
    except Exception:  # a probe only
        return 0


def estimate_memory(cfg: RunConfig, task, layout: Layout, alg: Algorithm) -> tuple[int, str]:
    """Peak memory (bytes) a run needs, and how it was computed: this process's memory now (its
    libraries and the task's data, already built) plus [N, d] tensors x :func:`state_tensors`,
    the batches (per sample of a step: twice the gathered row and twice the intermediate values
    one more row adds to the loss, :func:`_values_per_sample`, for the values and their
    gradients; or an evaluation chunk of up to 4,096 rows, without gradients, when larger) and a
    fixed overhead; at least the process's peak so far (building the task). Within 2x of the
    measured peak RSS on the cases of README "Memory estimate"."""
    n, d = cfg.workers.count, layout.d
    elem = torch.empty(0, dtype=next(iter(task.init_params(torch.Generator().manual_seed(0)).values())).dtype).element_size()
    tensors, which = state_tensors(cfg)
    state = int(n * d * elem * tensors)
    row = int(task.train_x[:1].numel())
    values = _values_per_sample(task)
    per_step = _samples_per_step(cfg, task.n_train)
    # a step: the gathered rows, the loss's intermediate values and their gradients (2 x each);
    # an evaluation chunk (no gradients): rows and values once
    batches = max(per_step * 2 * (row + values), min(4096, max(task.n_train, 1)) * (row + values)) * elem
    per_sample = 2 * (row + values)
    now, peak = process_memory()
    need = max(peak, now + state + batches + RUN_OVERHEAD_BYTES)
    how = (f"{n} workers x d = {d} x {elem} bytes x {tensors:g} tensors ({which}) = {_gib(state)} + batches of "
           f"{per_step} samples x {per_sample} values {_gib(batches)} + this process with its data {_gib(now)} + "
           f"{_gib(RUN_OVERHEAD_BYTES)} overhead")
    return need, how


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _memory_limit(cfg: RunConfig) -> tuple[int | None, str]:
    if cfg.memory_limit_gb is not None:
        return int(cfg.memory_limit_gb * 2**30), "memory_limit_gb"
    return machine_memory()


def _refuse(cfg: RunConfig, need: int, how: str, limit: int, source: str, batches_dominate: bool) -> None:
    key = "workers.batch_size" if batches_dominate else "workers.count"
    raise ConfigError(
        f"config key '{key}': the run needs an estimated {_gib(need)} ({how}), more than the limit "
        f"{_gib(limit)} ({source}); use fewer workers or a smaller model/batch, or override with "
        "memory_limit_gb: <GiB> or memory_check: false (--no-memory-check)"
    )


def check_memory_before_task(cfg: RunConfig) -> None:
    """Refuse, before the task is built, a run whose [N, d] tensors alone exceed the limit."""
    if not cfg.memory_check:
        return
    up_front = estimate_memory_before_task(cfg)
    limit, source = _memory_limit(cfg)
    if up_front is not None and limit is not None and up_front[0] > limit:
        _refuse(cfg, up_front[0], up_front[1], limit, source, False)


def check_memory(cfg: RunConfig, task, layout: Layout, alg: Algorithm) -> None:
    if not cfg.memory_check:
        return
    need, how = estimate_memory(cfg, task, layout, alg)
    limit, source = _memory_limit(cfg)
    if limit is not None and need > limit:
        tensors, _ = state_tensors(cfg)
        state = cfg.workers.count * layout.d * tensors
        batches = _samples_per_step(cfg, task.n_train) * 2 * (int(task.train_x[:1].numel()) + _values_per_sample(task))
        _refuse(cfg, need, how, limit, source, batches > state and cfg.workers.batch_size != "full")
