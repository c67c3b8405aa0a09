"""Synchronous simulator: N workers (1..1000) in one process.

Workers share the model in synchronous SGD, so the N per-worker gradients are computed in one
call over a ``[N, batch, ...]`` stack of the workers' mini-batches — no model copies, no Python
loop over workers. Two gradient paths (``gradient_path``):

* ``vmap``: ``torch.func.vmap(torch.func.grad(loss))``; works for every task;
* ``grouped``: for modules made of Linear layers only, one ordinary forward/backward over all
  ``N * batch`` samples and one batched matmul per layer (:mod:`.grouped_grad`), faster than
  vmap (timings in ``benchmarks/bench_simulator.py``). ``auto`` (the default) uses it when the task supports it *and* it matches ``vmap`` on a
  probe batch at start-up, else ``vmap``. The model is kept as one flat
vector ``w`` of size d (the parameter tensors concatenated in the task's order); the algorithm's
worker and server steps act on ``[N, d]`` rows.

Mini-batches: each step every worker draws ``batch_size`` rows uniformly with replacement from
its own shard (``batch_size="full"`` uses the whole shard: exact local gradients). The data split
is ``iid`` or ``shards`` (sort by label, cut into shards, a fixed number per worker).
Everything random comes from one ``torch.Generator`` seeded by ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from ..algorithm import Algorithm, ServerOutput, WorkerOutput
from ..compressors import row_counts
from ..schedules import Schedule
from ..tasks import Task, split_workers
from .. import topology as topo
from .grouped_grad import GradientFactors, GroupedLinearGradients, grouped_gradients_supported

GRADIENT_PATHS = ("auto", "vmap", "grouped")


def param_layout(params: dict[str, torch.Tensor]) -> tuple[list[str], list[torch.Size], list[int]]:
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [int(params[n].numel()) for n in names]
    return names, shapes, sizes


def flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


@dataclass
class StepRecord:
    """What one synchronous step did. ``grads`` ([N, d] raw stochastic gradients, before weight
    decay / prox) is built on first access when the step kept them in factored form."""

    step: int
    lr: float
    params_before: torch.Tensor  # [d]
    _grads: object  # [N, d] tensor, or GradientFactors (grouped path)
    worker: WorkerOutput
    server: ServerOutput
    nnz: torch.Tensor  # [N] uplink support sizes
    up_bytes: int
    down_bytes: int
    down_nnz: int
    server_state_before: dict

    @property
    def grads(self) -> torch.Tensor:
        if isinstance(self._grads, GradientFactors):
            self._grads = self._grads.dense(self.params_before.numel(), self.params_before.dtype)
        return self._grads

    def weighted_grad(self, p: torch.Tensor) -> torch.Tensor:
        """sum_q p_q g_q ([d]) without forming the [N, d] gradients when they are factored."""
        if isinstance(self._grads, GradientFactors):
            return self._grads.weighted_sum(p, self.params_before.numel())
        return p.to(self._grads.dtype) @ self._grads


class SyncSimulator:
    def __init__(
        self,
        task: Task,
        algorithm: Algorithm,
        schedule: Schedule,
        *,
        n_workers: int,
        batch_size: int | str = 1,
        split: str = "iid",
        shards_per_worker: int = 2,
        weights: list[float] | None = None,
        seed: int = 0,
        value_dtype: str = "fp32",
        gradient_shift: str = "none",
        gradient_path: str = "auto",
        in_place_memory: bool = True,
    ) -> None:
        if not (1 <= n_workers <= 100_000):
            raise ValueError(f"n_workers must be >= 1, got {n_workers!r}")
        if value_dtype not in topo.VALUE_BYTES:
            raise ValueError(f"value_dtype must be one of {list(topo.VALUE_BYTES)}, got {value_dtype!r}")
        self.task, self.alg, self.schedule = task, algorithm, schedule
        self.n_workers, self.seed = n_workers, seed
        self.value_bytes = topo.VALUE_BYTES[value_dtype]
        self.gen = torch.Generator().manual_seed(seed)
        params0 = task.init_params(self.gen)
        self.names, self.shapes, self.sizes = param_layout(params0)
        self.d = sum(self.sizes)
        self.w = flatten(params0).clone()
        self.dtype = self.w.dtype  # float32, or float64 for tasks built with dtype="float64"

        # --- data assignment
        if task.worker_data is not None:
            rows = [torch.as_tensor(r, dtype=torch.long) for r in task.worker_data]
            if len(rows) != n_workers:
                raise ValueError(
                    f"task {task.name!r} fixes {len(rows)} workers (one per local objective), "
                    f"but n_workers = {n_workers}; set workers.count = {len(rows)}"
                )
        else:
            # shards sort rows by label (class labels, +-1 labels or regression targets alike)
            labels = task.train_y if task.train_y.dim() == 1 else None
            rows = split_workers(
                task.n_train, labels, n_workers, split, shards_per_worker=shards_per_worker, generator=self.gen
            )
        self.worker_rows = rows
        self.lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
        if int(self.lens.min()) == 0:
            raise ValueError("a worker received no training rows; use fewer workers or another split")
        self.offsets = torch.cumsum(self.lens, 0) - self.lens
        self.rows_cat = torch.cat(rows)
        if batch_size == "full":
            if int(self.lens.min()) != int(self.lens.max()):
                self.full_batch_equal = False
            else:
                self.full_batch_equal = True
        elif not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer or 'full', got {batch_size!r}")
        self.batch_size = batch_size

        if weights is None:
            self.weights = torch.full((n_workers,), 1.0 / n_workers, dtype=self.dtype)
        else:
            if len(weights) != n_workers or any(p < 0 for p in weights):
                raise ValueError(f"weights must be {n_workers} non-negative numbers, got {weights!r}")
            self.weights = torch.tensor(weights, dtype=self.dtype)
        self.worker_ids = torch.arange(n_workers)
        if gradient_shift not in ("none", "optimum"):
            raise ValueError(f"gradient_shift must be 'none' or 'optimum', got {gradient_shift!r}")
        self.x_star = None
        if gradient_shift == "optimum":
            # EF-GD* (paper 002, App. C.3.2): g_i(x) - g_i(x*), same samples at both points
            if task.x_star is None:
                raise ValueError(f"gradient_shift 'optimum' needs a task with a known optimum; {task.name!r} has none")
            self.x_star = flatten(task.x_star).to(self.dtype)

        self.wstate = algorithm.init_worker_state(n_workers, self.d, self.dtype)
        self.sstate = algorithm.init_server_state(self.d, self.dtype)
        self.t = 0
        self.samples_seen = 0
        # cumulative accounting
        self.uplink_bytes = 0
        self.downlink_bytes = 0
        self.density_sum = 0.0
        self.total_error = 0.0
        #: accumulate sum_t ||sum_q p_q e_q||^2 every step (the runner turns it off when unused)
        self.track_total_error = True
        # stagewise learning (paper 004 §6)
        self.anchor = self.w.clone() if schedule.kind == "stagewise" else None
        self.stage_sum = torch.zeros(self.d, dtype=self.dtype) if schedule.kind == "stagewise" else None
        self.stage_count = 0

        self._vgrad_dict = vmap(grad(task.loss), in_dims=(None, 0, 0))
        self._grad = grad(self._loss_flat)
        self.gradient_path = self._choose_gradient_path(gradient_path)
        #: grouped path + an ef/memory step: accumulate lr * g straight into the memory buffer
        #: (one pass, no [N, d] gradient tensor); the memory is then updated in place
        self.fused_memory = bool(
            in_place_memory
            and self.gradient_path == "grouped"
            and algorithm.accumulates_in_place
            and "e" in self.wstate
            and self.x_star is None
            and schedule.kind != "stagewise"
            and not (batch_size == "full" and not self.full_batch_equal)
        )
        self._live = [True]

    def _choose_gradient_path(self, requested: str) -> str:
        if requested not in GRADIENT_PATHS:
            raise ValueError(f"gradient_path must be one of {list(GRADIENT_PATHS)}, got {requested!r}")
        if requested == "vmap":
            return "vmap"
        supported = grouped_gradients_supported(self.task, self.names)
        if not supported:
            if requested == "grouped":
                raise ValueError(
                    f"gradient_path 'grouped' needs a task whose parameters all belong to nn.Linear "
                    f"layers of task.module; {self.task.name!r} is not one (use 'vmap' or 'auto')"
                )
            return "vmap"
        self._grouped = GroupedLinearGradients(self.task, self.names, self.sizes)
        if requested == "grouped":
            return "grouped"
        # auto: the grouped path assumes a per-sample mean loss without cross-sample terms; check
        # it against vmap on a probe (3 workers x 2 rows, drawn without touching self.gen)
        n_probe = min(3, self.task.n_train)
        rows = torch.arange(2 * n_probe).remainder(self.task.n_train).view(n_probe, 2)
        x, y = self.task.train_x[rows], self.task.train_y[rows]
        g_vmap = self._vgrad_vmap(self.w, x, y)
        g_grouped = self._vgrad_grouped(self.w, x, y)
        tol = 1e-4 * float(g_vmap.abs().max()) + 1e-6
        return "grouped" if float((g_vmap - g_grouped).abs().max()) <= tol else "vmap"

    # ---- model helpers ----------------------------------------------------------------
    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(w, self.sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def _vgrad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[N, d] gradients for the N stacked batches x[q], y[q] at the shared model w."""
        if self.gradient_path == "grouped":
            return self._vgrad_grouped(w, x, y)
        return self._vgrad_vmap(w, x, y)

    def _vgrad_grouped(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.d, dtype=w.dtype)
        return self._grouped(self.unflatten(w), x, y, out)

    def _vgrad_vmap(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The vmap path of :meth:`_vgrad`.

        Differentiating with respect to the parameter dict and copying each block into one
        [N, d] buffer is about twice as fast as differentiating the flat vector, whose split
        backward concatenates batched blocks.
        """
        grads = self._vgrad_dict(self.unflatten(w), x, y)
        n = x.shape[0]
        out = torch.empty(n, self.d, dtype=w.dtype)
        off = 0
        for name, size in zip(self.names, self.sizes):
            out[:, off : off + size].copy_(grads[name].reshape(n, size))
            off += size
        return out

    def _loss_flat(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task.loss(self.unflatten(w), x, y)

    @property
    def epoch(self) -> float:
        return self.samples_seen / max(self.task.n_train, 1)

    # ---- gradients --------------------------------------------------------------------
    def sample_rows(self) -> torch.Tensor:
        """[N, b] training-row indices for this step."""
        if self.batch_size == "full":
            return torch.stack([r for r in self.worker_rows]) if self.full_batch_equal else None
        r = torch.rand(self.n_workers, self.batch_size, generator=self.gen)
        pos = self.offsets[:, None] + (r * self.lens[:, None]).long().clamp_max(self.lens[:, None] - 1)
        return self.rows_cat[pos]

    def worker_gradients(self, w: torch.Tensor) -> torch.Tensor:
        """[N, d] stochastic gradients of all workers at w (one vmapped call)."""
        idx = self.sample_rows()
        if idx is None:  # full local batches of unequal sizes: one call per worker
            g = torch.stack(
                [self._grad(w, self.task.train_x[r], self.task.train_y[r]) for r in self.worker_rows]
            )
            if self.x_star is not None:
                g = g - torch.stack(
                    [self._grad(self.x_star, self.task.train_x[r], self.task.train_y[r]) for r in self.worker_rows]
                )
            self.samples_seen += int(self.lens.sum())
            return g
        x, y = self._stacked_batch(idx)
        g = self._vgrad(w, x, y)
        if self.x_star is not None:
            g = g - self._vgrad(self.x_star, x, y)
        return g

    def _stacked_batch(self, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's mini-batches stacked as x [N, b, ...], y [N, b] (rows drawn now unless
        given); counts the samples."""
        idx = self.sample_rows() if idx is None else idx
        self.samples_seen += idx.numel()
        return self.task.train_x[idx], self.task.train_y[idx]

    def loop_gradients(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reference path: one gradient call per worker (tests compare it with the vmapped one)."""
        return torch.stack(
            [self._grad(w, self.task.train_x[i], self.task.train_y[i]) for i in idx]
        )

    def worker_phase(self, grads: torch.Tensor, w: torch.Tensor, t: int, lr: float):
        """All workers' side of the step, in one batched call."""
        return self.alg.worker_step(grads, w, self.wstate, t, lr, self.worker_ids)

    def _fused_worker_phase(self, w: torch.Tensor, t: int, lr: float):
        """Gradients and the workers' ef/memory step in one pass over the memory:
        e <- e + c g is written from the grouped-gradient factors, then compressed in place."""
        x, y = self._stacked_batch()
        factors = self._grouped.factors(self.unflatten(w), x, y)
        live = self._renew_live_token()
        e = self.wstate["e"]
        factors.write_into(e, alpha=self.alg.accumulation_scale(lr), accumulate=True)
        wo = self.alg.worker_step_accumulated(e, self.wstate, t, lr, self.worker_ids, live=live)
        return factors, wo

    def _renew_live_token(self) -> list:
        """Called before the memory is overwritten in place: the previous step's WorkerOutput can
        no longer rebuild its accumulated vectors (it raises instead); returns this step's token."""
        self._live[0] = False
        self._live = [True]
        return self._live

    # ---- one synchronous step ---------------------------------------------------------
    def step(self) -> StepRecord:
        t = self.t
        if self.schedule.stage_start(t):
            self.anchor = self.stage_sum / max(self.stage_count, 1)
            self.stage_sum.zero_()
            self.stage_count = 0
        lr = float(self.schedule(t, self.epoch))
        w = self.w
        if self.fused_memory:
            grads, wo = self._fused_worker_phase(w, t, lr)
        else:
            grads = self.worker_gradients(w)
            g_in = grads
            if self.anchor is not None:
                g_in = grads + (w - self.anchor) / self.schedule.prox_gamma
            wo = self.worker_phase(g_in, w, t, lr)
        sstate_before = self.sstate
        so = self.alg.server_step(wo.message, self.weights, self.sstate, t, lr)
        self.wstate, self.sstate = wo.state, so.state
        self.w = w - so.update
        if self.stage_sum is not None:
            self.stage_sum += self.w
            self.stage_count += 1

        # --- accounting
        comp = self.alg.compressor
        if wo.sparse is not None:
            nnz = torch.full((self.n_workers,), wo.sparse.indices.shape[1], dtype=torch.long)
            up_nb = topo.indices_nbytes(
                wo.sparse.indices, self.d, seeded=comp.seeded_support, value_bytes=self.value_bytes
            )
        else:
            nnz = row_counts(wo.support)
            up_nb = topo.message_nbytes(
                wo.support,
                dense=comp.name == "identity",
                seeded=comp.seeded_support,
                value_bytes=self.value_bytes,
            )
        if self.alg.topology == "all_to_all":
            down_nnz, down_nb = 0, 0  # no server message: workers receive each other's messages
        else:
            down_mask = so.down_support if so.down_support is not None else so.update != 0
            down_nnz = int(row_counts(down_mask))
            down_nb = int(
                topo.message_nbytes(down_mask[None], dense=False, seeded=False, value_bytes=self.value_bytes)[0]
            )
        up, down = topo.traffic(self.alg.topology, up_nb, down_nb, self.n_workers)
        self.uplink_bytes += up
        self.downlink_bytes += down
        self.density_sum += float(nnz.float().mean()) / self.d
        if self.track_total_error and "e" in self.wstate:
            e_mean = self.weights @ self.wstate["e"]
            self.total_error += float(e_mean.square().sum())
        self.t += 1
        return StepRecord(t, lr, w, grads, wo, so, nnz, up, down, down_nnz, sstate_before)

    # ---- evaluation -------------------------------------------------------------------
    def _chunks(self, n: int, size: int = 4096):
        for a in range(0, n, size):
            yield a, min(n, a + size)

    @torch.no_grad()
    def full_loss(self, w: torch.Tensor | None = None) -> float:
        w = self.w if w is None else w
        n = self.task.n_train
        tot = 0.0
        for a, b in self._chunks(n):
            tot += float(self._loss_flat(w, self.task.train_x[a:b], self.task.train_y[a:b])) * (b - a)
        return tot / n

    def full_gradient(self, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.w if w is None else w
        n = self.task.n_train
        g = torch.zeros(self.d, dtype=self.dtype)
        for a, b in self._chunks(n):
            g += self._grad(w, self.task.train_x[a:b], self.task.train_y[a:b]) * (b - a)
        return g / n

    @torch.no_grad()
    def test_accuracy(self, w: torch.Tensor | None = None) -> float | None:
        if self.task.predict is None:
            return None
        x, y = (self.task.test_x, self.task.test_y)
        if x is None:
            x, y = self.task.train_x, self.task.train_y
        w = self.w if w is None else w
        params = self.unflatten(w)
        correct = 0
        for a, b in self._chunks(int(x.shape[0])):
            correct += int((self.task.predict(params, x[a:b]).argmax(dim=-1) == y[a:b]).sum())
        return correct / int(x.shape[0])

    # ---- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "t": self.t,
            "w": self.w.clone(),
            "wstate": {k: v.clone() for k, v in self.wstate.items()},
            "sstate": {k: v.clone() for k, v in self.sstate.items()},
            "gen": self.gen.get_state(),
            "samples_seen": self.samples_seen,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "density_sum": self.density_sum,
            "total_error": self.total_error,
            "anchor": None if self.anchor is None else self.anchor.clone(),
            "stage_sum": None if self.stage_sum is None else self.stage_sum.clone(),
            "stage_count": self.stage_count,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.t = int(sd["t"])
        self.w = sd["w"].clone()
        self.wstate = {k: v.clone() for k, v in sd["wstate"].items()}
        self.sstate = {k: v.clone() for k, v in sd["sstate"].items()}
        self.gen.set_state(sd["gen"])
        for k in ("samples_seen", "uplink_bytes", "downlink_bytes", "density_sum", "total_error", "stage_count"):
            setattr(self, k, sd[k])
        self.anchor = None if sd["anchor"] is None else sd["anchor"].clone()
        self.stage_sum = None if sd["stage_sum"] is None else sd["stage_sum"].clone()
