"""Loop engine (``engine: loop``): one model copy per worker and a Python loop over workers.

This is how many federated-learning scripts simulate N workers, and how N separate processes
would run: each worker loads the shared model into its own copy, runs forward/backward on its
own mini-batch and then its own worker step on its own state (``n = 1``: error feedback and
compression of one vector, through the algorithm's in-place entry where it applies, as a DDP
hook would). It is the reference the vectorized :class:`~gradsparse.engines.sync_sim.SyncSimulator`
is checked against (same parameters, ``tests/test_engines.py``) and measured against
(``benchmarks/bench_simulator.py``). Both engines draw the same mini-batches from the same seed.

Tasks with an ``nn.Module`` get real model copies (``copy.deepcopy``) with autograd on their
own parameters; functional tasks (toy, linear and logistic regression) take one
``torch.func.grad`` call per worker.
"""

from __future__ import annotations

import torch

from ..algorithm import WorkerStepOutput
from ..feedback import FeedbackOutput
from ..messages import SparseBatch
from .base import ModelCopy
from .synchronous import SynchronousEngine


class LoopSimulator(SynchronousEngine):
    name = "loop"

    def __init__(self, task, algorithm, schedule, **kw) -> None:
        super().__init__(task, algorithm, schedule, **kw)
        self.models = None
        if task.module is not None:
            self.models = [ModelCopy(task, self.layout) for _ in range(self.n_workers)]

    def worker_gradient(self, q: int, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Worker q's gradient at w on its rows, computed in its own model copy."""
        x, y = self.task.train_x[rows], self.task.train_y[rows]
        g = self._grad(w, x, y) if self.models is None else self.models[q].gradient(w, x, y)
        return self.shifted(g, lambda x_star: self._grad(x_star, x, y))

    def worker_round(self, w, t, lr):
        idx = self.data.sample()
        self.samples_seen += sum(len(r) for r in idx) if isinstance(idx, list) else idx.numel()
        grads = torch.stack([self.worker_gradient(q, w, idx[q]) for q in range(self.n_workers)])
        fed = self.feedback_gradients(grads, w)
        live = self._renew_live_token()
        outs = []
        for q in range(self.n_workers):  # worker q updates its own rows (views into the shared buffers)
            outs.append(self.alg.worker_update_(fed[q : q + 1], w, self.worker_state.rows(slice(q, q + 1)), step=t,
                                                lr=lr, workers=self.worker_ids[q : q + 1],
                                                in_place=self.stagewise is None))
        state = self.worker_state
        message = SparseBatch.cat([o.message for o in outs])
        accumulated = [o.feedback.accumulated for o in outs]
        feedback = FeedbackOutput(
            message,
            torch.cat([o.feedback.accumulated_values for o in outs]),
            None if accumulated[0] is None else torch.cat(accumulated),
        )
        inputs = [o.feedback_input for o in outs]
        out = WorkerStepOutput(message, torch.cat([o.nbytes for o in outs]), state, feedback,
                               None if inputs[0] is None else torch.cat(inputs))
        return grads, out, live
