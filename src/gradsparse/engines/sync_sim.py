"""Synchronous simulator (``engine: sync``): N workers (1..1000+) in one process, vectorized.

Workers share the model in synchronous SGD, so the N per-worker gradients are computed in one
call over a ``[N, batch, ...]`` stack of the workers' mini-batches — no model copies, no Python
loop over workers — and the algorithm's worker step runs once on ``[N, d]`` rows. Gradient paths
(``gradient_path``):

* ``vmap``: ``torch.func.vmap(torch.func.grad(loss))``; works for every task;
* ``grouped``: for modules made of Linear layers only, one ordinary forward/backward over all
  ``N * batch`` samples and one batched matmul per layer (:mod:`.grouped_grad`);
* ``auto`` (default): ``grouped`` when the task supports it *and* it matches ``vmap`` on a probe
  batch at start-up, else ``vmap``.

Factored gradients (``in_place_memory``, on by default): with grouped gradients the simulator
hands the algorithm's worker entry (``Algorithm.worker_update_``) the gradients in factored form;
where the algorithm's step is "a = e + c g, compress, keep a - s" the entry writes e + c g
straight from the factors into the memory buffer — no ``[N, d]`` gradient tensor — and otherwise
expands them (the entry chooses; ``uses_in_place_memory`` reports what it takes). The step record
guards its accumulated vectors (they may live in the memory buffer until the next round).
"""

from __future__ import annotations

import torch
from torch.func import grad, vmap

from ..algorithm import Algorithm
from ..schedules import Schedule
from ..tasks import Task
from .grouped_grad import GroupedLinearGradients, grouped_gradients_supported
from .synchronous import SynchronousEngine

GRADIENT_PATHS = ("auto", "vmap", "grouped")


class SyncSimulator(SynchronousEngine):
    name = "sync"

    def __init__(self, task: Task, algorithm: Algorithm, schedule: Schedule, *, gradient_path: str = "auto",
                 in_place_memory: bool = True, **kw) -> None:
        super().__init__(task, algorithm, schedule, **kw)
        self._vgrad_dict = vmap(grad(task.loss), in_dims=(None, 0, 0))
        self.gradient_path = self._choose_gradient_path(gradient_path)
        #: the worker entry gets the gradient factors (it may add them into the memory in place)
        self.hands_factors = bool(
            in_place_memory
            and self.gradient_path == "grouped"
            and self.x_star is None  # the EF-GD* shift and the stagewise proximal term change
            and self.stagewise is None  # the gradients; ragged full batches come per shard size
            and not self.data.ragged
        )

    @property
    def uses_in_place_memory(self) -> bool:
        """Whether the worker step runs in the memory's buffer from the factors (reported, not chosen:
        the algorithm's worker entry takes the in-place step where it applies)."""
        return self.hands_factors and self.alg.takes_in_place_step()

    def _choose_gradient_path(self, requested: str) -> str:
        if requested not in GRADIENT_PATHS:
            raise ValueError(f"gradient_path must be one of {list(GRADIENT_PATHS)}, got {requested!r}")
        if requested == "vmap":
            return "vmap"
        if not grouped_gradients_supported(self.task, list(self.layout.names)):
            if requested == "grouped":
                raise ValueError(
                    f"gradient_path 'grouped' needs a task whose parameters all belong to nn.Linear "
                    f"layers of task.module; {self.task.name!r} is not one (use 'vmap' or 'auto')"
                )
            return "vmap"
        self._grouped = GroupedLinearGradients(self.task, list(self.layout.names), list(self.layout.sizes))
        if requested == "grouped":
            return "grouped"
        # auto: the grouped path assumes a per-sample mean loss without cross-sample terms; check
        # it against vmap on a probe (3 workers x 2 rows, drawn without touching the generator)
        n_probe = min(3, self.task.n_train)
        rows = torch.arange(2 * n_probe).remainder(self.task.n_train).view(n_probe, 2)
        x, y = self.task.train_x[rows], self.task.train_y[rows]
        g_vmap = self._vgrad_vmap(self.w, x, y)
        try:
            g_grouped = self._vgrad_grouped(self.w, x, y)
        except RuntimeError:  # e.g. a Linear layer the forward calls twice, or never
            return "vmap"
        tol = 1e-4 * float(g_vmap.abs().max()) + 1e-6
        return "grouped" if float((g_vmap - g_grouped).abs().max()) <= tol else "vmap"

    # ---- gradients ------------------------------------------------------------------------
    def _vgrad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[N, d] gradients for the N stacked batches x[q], y[q] at the shared model w."""
        if self.gradient_path == "grouped":
            return self._vgrad_grouped(w, x, y)
        return self._vgrad_vmap(w, x, y)

    def _vgrad_grouped(self, w, x, y):
        out = torch.empty(x.shape[0], self.d, dtype=w.dtype)
        return self._grouped(self.layout.unflatten(w), x, y, out)

    def _vgrad_vmap(self, w, x, y):
        """Differentiate with respect to the parameter dict and copy each block into one [N, d]
        buffer (about twice as fast as differentiating the flat vector)."""
        grads = self._vgrad_dict(self.layout.unflatten(w), x, y)
        n = x.shape[0]
        out = torch.empty(n, self.d, dtype=w.dtype)
        for name, a, b in self.layout.bounds():
            out[:, a:b].copy_(grads[name].reshape(n, b - a))
        return out

    def worker_gradients(self, w: torch.Tensor) -> torch.Tensor:
        """[N, d] stochastic gradients of all workers at w (one vectorized call)."""
        idx = self.data.sample()
        if isinstance(idx, list):  # full local batches of unequal sizes: one call per shard size
            self.samples_seen += sum(len(r) for r in idx)
            g = torch.empty(self.data.n_workers, self.d, dtype=w.dtype)
            for workers, x, y in self._ragged_groups(idx):
                g[workers] = self.shifted(self._vgrad(w, x, y), lambda xs: self._vgrad(xs, x, y))
            return g
        self.samples_seen += idx.numel()
        x, y = self.task.train_x[idx], self.task.train_y[idx]
        return self.shifted(self._vgrad(w, x, y), lambda xs: self._vgrad(xs, x, y))

    def _ragged_groups(self, idx: list) -> list:
        """Workers grouped by shard size, each group's rows stacked ``[n_group, size]`` (the full
        local batches never change: built once)."""
        groups = getattr(self, "_ragged_cache", None)
        if groups is None:
            lens = self.data.lens
            tx, ty = self.task.train_x, self.task.train_y
            groups = []
            for size in torch.unique(lens).tolist():
                workers = torch.nonzero(lens == size).reshape(-1)
                rows = torch.stack([idx[q] for q in workers.tolist()])
                groups.append((workers, tx[rows], ty[rows]))
            self._ragged_cache = groups
        return groups

    # ---- the workers' side of a round ---------------------------------------------------------
    def worker_round(self, w, t, lr):
        if not self.hands_factors:
            grads = self.worker_gradients(w)
            live = self._renew_live_token()
            # the out-of-place step (a = e + c g in a new tensor, which becomes the memory): the fast
            # path below is the in-place one
            out = self.alg.worker_update_(self.feedback_gradients(grads, w), w, self.worker_state, step=t, lr=lr,
                                          workers=self.worker_ids, in_place=False, rebind=True)
            return grads, out, live
        idx = self.data.sample()
        self.samples_seen += idx.numel()
        factors = self._grouped.factors(self.layout.unflatten(w), self.task.train_x[idx], self.task.train_y[idx])
        live = self._renew_live_token()
        out = self.alg.worker_update_(factors, w, self.worker_state, step=t, lr=lr, workers=self.worker_ids, rebind=True)
        return factors, out, live
