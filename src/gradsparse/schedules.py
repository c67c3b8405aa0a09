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
- ``stagewise``:       paper 004 §6, stage s runs T_s steps at eta_s = eta_0/(s+1); see
                       :class:`StagewiseLearning` for what the engines do at stage boundaries.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .constraints import Interval, check_all


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

    KINDS: ClassVar[tuple[str, ...]] = ("constant", "step_decay", "inverse_power", "momentum_aware",
                                        "strongly_convex", "stagewise")
    #: the bounds of the numeric parameters (the config schema reads the same table)
    CONSTRAINTS: ClassVar[dict[str, Interval]] = {
        "lr": Interval(0.0, None, closed="neither"),
        "warmup_epochs": Interval(0.0, None),
        "warmup_start": Interval(0.0, None),
        "power": Interval(0.0, None),
        "beta": Interval(0.0, 1.0, closed="left"),
        "mu": Interval(0.0, None, closed="neither"),
        "prox_gamma": Interval(0.0, None, closed="neither"),
    }

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}; allowed: {', '.join(self.KINDS)}")
        check_all("schedule", self.CONSTRAINTS, {name: getattr(self, name) for name in self.CONSTRAINTS})
        if self.kind == "stagewise" and not self.stage_steps:
            raise ValueError("stagewise schedule needs stage_steps (a list of T_s)")

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

    def first_nonpositive(self, steps: int, epoch_of_step) -> int | None:
        """The first step t < ``steps`` whose step size is <= 0 (or not finite), else None."""
        for t in range(steps):
            v = self(t, epoch_of_step(t))
            if not (v > 0) or math.isinf(v):
                return t
        return None


class StagewiseLearning:
    """Paper 004 §6 (Lemma 11, eq. 15-16): stage s is a fresh run of Algorithm 1.

    Stage s starts at w_{s,0} = w~_s (w~_0 = the initial model) with zero memory and momentum
    (the engine re-initialises the algorithm's state), runs T_s steps at the constant step
    eta_s = eta_0/(s+1) on F(w) + (1/2 gamma)||w - w~_s||^2 (the engine adds the proximal
    gradient (w - w~_s)/gamma to every worker's gradient), and
    w~_{s+1} = (1/T_s) sum_{t=0}^{T_s-1} w_{s,t}: the mean of the iterates the stage's steps were
    taken at (w_{s,0} included, the stage's last update excluded). ``averages`` lists w~_1, w~_2, ...
    as each stage ends at the start of the next; :meth:`output` forms the last stage's average
    w~_S, the algorithm's output (the runner reports it as the run's final value).
    """

    def __init__(self, schedule: Schedule, w0: torch.Tensor) -> None:
        self.schedule = schedule
        self.anchor = w0.clone()
        self.stage_sum = torch.zeros_like(w0)
        self.stage_count = 0
        self.averages: list[torch.Tensor] = []

    def begin_step(self, t: int, w: torch.Tensor) -> torch.Tensor | None:
        """At the first step of a new stage: the new anchor w~_s (the engine restarts from it and
        resets the algorithm's state); otherwise None. Then records w as an iterate of the stage."""
        restart = None
        if self.schedule.stage_start(t):
            self.anchor = self.stage_sum / self.stage_count
            self.averages.append(self.anchor.clone())
            self.stage_sum = torch.zeros_like(self.stage_sum)
            self.stage_count = 0
            restart = self.anchor.clone()
            w = restart
        self.stage_sum += w
        self.stage_count += 1
        return restart

    def output(self) -> torch.Tensor | None:
        """w~_S: the mean of the iterates the current (last) stage's steps were taken at, i.e. the
        stage average that would start the next stage; None before the first step."""
        if self.stage_count == 0:
            return None
        return self.stage_sum / self.stage_count

    def proximal_gradient(self, w: torch.Tensor) -> torch.Tensor:
        return (w - self.anchor) / self.schedule.prox_gamma

    def state_dict(self) -> dict:
        return {"anchor": self.anchor.clone(), "stage_sum": self.stage_sum.clone(),
                "stage_count": self.stage_count, "averages": [a.clone() for a in self.averages]}

    def load_state_dict(self, sd: dict) -> None:
        self.anchor, self.stage_sum = sd["anchor"].clone(), sd["stage_sum"].clone()
        self.stage_count = int(sd["stage_count"])
        self.averages = [a.clone() for a in sd["averages"]]
