"""Staleness dampening: the weight a server gives a message computed tau versions ago.

The server step (:meth:`gradsparse.algorithm.Algorithm.server_step`) takes the versions the
messages were computed at; with the server at step t, a message from version v has staleness
tau = t - v >= 0 and its weight p_q is multiplied by ``factor(tau)``:

===================  ==============================  ==============================================
kind                 factor(tau)                     source
===================  ==============================  ==============================================
none                 1
exponential          exp(-beta tau)                  Kardam (Damaskinos et al., ICML 2018) as
                                                     paper 001 describes it; a fresh message has 1
exponential_density  beta exp(-beta tau)             paper 001's appendix read literally as the
                                                     density of Exp(beta): a fresh message has beta
inverse              1 / (1 + tau)                   polynomial staleness weight (FLSim style, a = 1)
===================  ==============================  ==============================================

``beta`` defaults to 0.2 (paper 001). A synchronous engine passes no versions (tau = 0 for all).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .constraints import Interval, check_all

__all__ = ["StalenessDampening", "DAMPENINGS"]

DAMPENINGS = ("none", "exponential", "exponential_density", "inverse")


class StalenessDampening:
    #: the bounds of the numeric parameters (the config schema reads the same table)
    CONSTRAINTS: ClassVar[dict[str, Interval]] = {"beta": Interval(0.0, None, closed="neither")}

    def __init__(self, kind: str = "none", beta: float = 0.2) -> None:
        if kind not in DAMPENINGS:
            raise ValueError(f"unknown staleness dampening {kind!r}; allowed: {', '.join(DAMPENINGS)}")
        check_all("staleness dampening", self.CONSTRAINTS, {"beta": beta})
        self.kind, self.beta = kind, float(beta)

    def factor(self, staleness: torch.Tensor) -> torch.Tensor:
        tau = staleness.to(torch.float64)
        if bool((tau < 0).any()):
            raise ValueError(f"staleness must be >= 0 (a message from the future?), got {staleness.tolist()}")
        if self.kind == "none":
            return torch.ones_like(tau)
        if self.kind == "exponential":
            return torch.exp(-self.beta * tau)
        if self.kind == "exponential_density":
            return self.beta * torch.exp(-self.beta * tau)
        return 1.0 / (1.0 + tau)

    def describe(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}(beta={self.beta:g})"
