"""Step-size schedules (ALGORITHMS.md §4).

A schedule is a callable ``lr(t, epoch) -> float`` with ``t`` the 0-based step counter and
``epoch`` the (fractional) number of passes over the training data so far.

- ``constant``:        alpha
- ``step_decay``:      alpha / 10^(number of milestones <= epoch)      (``milestones`` in epochs)
- ``warmup``:          linear from ``start`` to the base schedule's value over ``warmup_epochs``,
                       then the base schedule (``step_decay`` milestones may be combined)
- ``inverse_power``:   alpha / (t + 1)^a
- ``momentum_aware``:  paper 004, eta_t = eta (1/t^a - beta/(t+1)^a), with t counted from 1
- ``strongly_convex``: paper 004, eta_t = (1 - beta t/(t+1)) / (mu t), t counted from 1
- ``stagewise``:       paper 004 §6, stage s runs T_s steps at eta_s = eta_0/(s+1); the
                       simulator adds the proximal term (1/2 gamma)||w - w~_s||^2 and restarts
                       the anchor w~_{s+1} at the average of stage s's iterates.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class Schedule:
    kind: str = "constant"
    lr: float = 0.1
    milestones: list[float] = field(default_factory=list)
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0
    power: float = 0.5
    beta: float = 0.0
    mu: float = 1.0
    # stagewise
    stage_steps: list[int] = field(default_factory=list)
    prox_gamma: float = 1.0

    KINDS = ("constant", "step_decay", "inverse_power", "momentum_aware", "strongly_convex", "stagewise")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}; allowed: {', '.join(self.KINDS)}")
        if self.kind == "stagewise" and not self.stage_steps:
            raise ValueError("stagewise schedule needs stage_steps (a list of T_s)")
        if self.kind == "strongly_convex" and self.mu <= 0:
            raise ValueError(f"strongly_convex schedule needs mu > 0, got {self.mu!r}")

    def base(self, t: int, epoch: float) -> float:
        k = self.kind
        if k == "constant":
            return self.lr
        if k == "step_decay":
            return self.lr * 0.1 ** bisect.bisect_right(sorted(self.milestones), epoch)
        if k == "inverse_power":
            return self.lr / (t + 1) ** self.power
        if k == "momentum_aware":
            s = t + 1
            return self.lr * (1.0 / s**self.power - self.beta / (s + 1) ** self.power)
        if k == "strongly_convex":
            s = t + 1
            return (1.0 - self.beta * s / (s + 1)) / (self.mu * s)
        if k == "stagewise":
            return self.lr / (self.stage_of(t) + 1)
        raise AssertionError(k)

    def __call__(self, t: int, epoch: float = 0.0) -> float:
        value = self.base(t, epoch)
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            frac = epoch / self.warmup_epochs
            return self.warmup_start + frac * (value - self.warmup_start)
        return value

    # --- stagewise learning -------------------------------------------------------------
    def stage_of(self, t: int) -> int:
        """Stage index of step t; the last stage repeats once the list is exhausted."""
        acc = 0
        for s, n in enumerate(self.stage_steps):
            acc += n
            if t < acc:
                return s
        return len(self.stage_steps) - 1 + (t - acc) // max(self.stage_steps[-1], 1) + 1

    def stage_start(self, t: int) -> bool:
        """True when step t is the first step of a stage (t > 0)."""
        if self.kind != "stagewise" or t == 0:
            return False
        return self.stage_of(t) != self.stage_of(t - 1)
