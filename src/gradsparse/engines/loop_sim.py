"""Baseline engine: one model copy per worker, a Python loop of forward/backward passes.

This is how many federated-learning scripts simulate N workers. It exists as the reference the
vectorized :class:`~gradsparse.engines.sync_sim.SyncSimulator` is measured against (speed, in
``benchmarks/bench_simulator.py``) and checked against (equal results, in the tests). Everything
but the gradient computation is inherited, so both engines draw the same mini-batches and run the
same algorithm. Each worker also runs its own worker step (error feedback and compression of one
vector), as it would in its own process.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..algorithm import WorkerOutput
from ..compressors import RowSparse
from .sync_sim import SyncSimulator


class LoopSimulator(SyncSimulator):
    """``module``: an ``nn.Module`` whose named parameters match the task's parameters and whose
    forward gives the logits fed to ``loss_fn(logits, y)`` (cross-entropy by default)."""

    def __init__(self, task, algorithm, schedule, *, module: nn.Module, loss_fn=None, **kw) -> None:
        super().__init__(task, algorithm, schedule, **kw)
        self.fused_memory = False  # gradients come from the model copies below
        self.models = [copy.deepcopy(module).train() for _ in range(self.n_workers)]
        for m in self.models:
            for p in m.parameters():
                p.requires_grad_(True)
        self.loss_fn = loss_fn or nn.functional.cross_entropy

    def worker_gradients(self, w: torch.Tensor) -> torch.Tensor:
        idx = self.sample_rows()
        self.samples_seen += idx.numel()
        params = self.unflatten(w)
        out = torch.empty(self.n_workers, self.d)
        for q, model in enumerate(self.models):
            with torch.no_grad():  # broadcast the global model into the worker's copy
                for name, p in model.named_parameters():
                    p.copy_(params[name])
            model.zero_grad(set_to_none=True)
            loss = self.loss_fn(model(self.task.train_x[idx[q]]), self.task.train_y[idx[q]])
            loss.backward()
            torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()], out=out[q])
        return out

    def worker_phase(self, grads: torch.Tensor, w: torch.Tensor, t: int, lr: float) -> WorkerOutput:
        if self.alg.accumulates_in_place and "e" in self.wstate:
            return self._worker_phase_in_place(grads, t, lr)
        outs = []
        for q in range(self.n_workers):
            state_q = {k: v[q : q + 1] for k, v in self.wstate.items()}
            outs.append(self.alg.worker_step(grads[q : q + 1], w, state_q, t, lr, self.worker_ids[q : q + 1]))
        state = {k: torch.cat([o.state[k] for o in outs]) for k in outs[0].state}
        if outs[0].sparse is not None:
            sparse, acc_vals = self._cat_sparse(outs)
            acc = torch.cat([o.accumulated for o in outs]) if "e" not in state else None
            return WorkerOutput(state, sparse=sparse, acc_values=acc_vals, accumulated=acc)
        return WorkerOutput(
            state,
            sent=torch.cat([o.sent for o in outs]),
            support=torch.cat([o.support for o in outs]),
            accumulated=torch.cat([o.accumulated for o in outs]),
        )

    def _worker_phase_in_place(self, grads: torch.Tensor, t: int, lr: float) -> WorkerOutput:
        """Each worker updates its own memory row in place, e_q += c g_q, then compresses it (as a
        per-worker script would, and as the vectorized engine does for all rows at once)."""
        live = self._renew_live_token()
        e = self.wstate["e"]
        c = self.alg.accumulation_scale(lr)
        outs = []
        for q in range(self.n_workers):
            e_q = e[q : q + 1]
            e_q.add_(grads[q : q + 1], alpha=c)
            outs.append(self.alg.worker_step_accumulated(e_q, {"e": e_q}, t, lr, self.worker_ids[q : q + 1]))
        sparse, acc_vals = self._cat_sparse(outs)
        return WorkerOutput(dict(self.wstate), sparse=sparse, acc_values=acc_vals, live=live)

    def _cat_sparse(self, outs: list[WorkerOutput]) -> tuple[RowSparse, torch.Tensor]:
        """The workers' one-row sparse messages (and accumulated values at their supports) as one."""
        sparse = RowSparse(
            torch.cat([o.sparse.indices for o in outs]), torch.cat([o.sparse.values for o in outs]), self.d
        )
        return sparse, torch.cat([o._acc_values for o in outs])
