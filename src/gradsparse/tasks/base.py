"""The interface every training task implements.

A task owns its data and a *pure functional* loss so that the synchronous simulator can
compute all workers' gradients in one ``torch.func.vmap(torch.func.grad(...))`` call.
Parameters are a dict name -> tensor (the order is the flattening order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Task:
    """A training problem.

    Fields
    ------
    name:         short identifier (e.g. ``"toy_quadratic"``, ``"logreg"``).
    init_params:  ``fn(generator) -> dict[str, Tensor]`` initial parameters (float32).
    loss:         ``fn(params, x, y) -> scalar`` mean loss over the batch (x, y). Must be pure
                  (no in-place ops on params, no data-dependent Python control flow) so it can be
                  ``vmap``-ed over a leading worker dimension of ``x``/``y`` with shared ``params``.
                  It includes every regulariser of the objective (so the full-data loss is f).
    train_x, train_y: full training set; ``train_y`` may be a dummy tensor.
    test_x, test_y:   held-out set or ``None``.
    predict:      ``fn(params, x) -> logits`` for classification tasks, else ``None``
                  (enables ``test_accuracy``).
    f_star:       optimal value of the full-training-set objective (convex tasks), else ``None``.
    x_star:       a minimiser (dict like params), else ``None``.
    convex:       whether f is convex.
    info:         extra numbers (L, mu, recommended step, ...).
    module:       the ``nn.Module`` behind ``loss``/``predict`` for module-based tasks, else
                  ``None``; structure only (its own parameter values are never used). The
                  simulator uses it for the faster grouped per-worker gradients.
    worker_data:  optional fixed assignment of training rows to workers (list of index tensors);
                  when set, the simulator uses it instead of its own split (e.g. the toy problem,
                  where worker q owns F^q).
    """

    name: str
    init_params: Callable[[torch.Generator], dict[str, torch.Tensor]]
    loss: Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    predict: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None = None
    f_star: float | None = None
    x_star: dict[str, torch.Tensor] | None = None
    convex: bool = False
    info: dict = field(default_factory=dict)
    worker_data: list[torch.Tensor] | None = None
    module: Any = None

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])
