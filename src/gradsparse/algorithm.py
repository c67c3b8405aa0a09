"""One algorithm description, runnable by every engine.

An :class:`Algorithm` composes the pieces of ALGORITHMS.md:

    weight decay -> [worker momentum] -> error feedback ∘ uplink compressor      (worker side)
    weighted aggregate -> [server momentum] -> step size -> [downlink compressor] (server side)

and exposes exactly two pure-ish steps with explicit state:

* :meth:`Algorithm.worker_step` — gradients of ``n`` workers (rows of ``[n, d]``) and their
  state -> messages, supports, new state. An engine with one worker per process calls it with
  ``n = 1``; the synchronous simulator calls it once for all workers.
* :meth:`Algorithm.server_step` — the messages that arrived (``[m, d]``), their weights and the
  server state -> the model update, the downlink support, new server state. For all-to-all every
  worker runs this same step on the gathered messages (so all models stay identical).

Momentum (§3):

* ``gradient`` (paper 002 Alg. 2): workers compress (gradient + memory); the aggregate Δ' is the
  same everywhere; m <- beta m + Δ'; direction m (heavy ball) or Δ' + beta m (Nesterov).
  This state lives with the server step.
* ``update`` (paper 002 Alg. 3, paper 004 Alg. 1): m^q <- beta m^q + g^q locally; the worker
  feeds m^q (heavy ball) or g^q + beta m^q (Nesterov) to its error feedback. Optional
  momentum-factor masking zeroes m^q and the memory at the transmitted coordinates.

Weight decay ``wd`` is added to the gradient before anything else: g <- g + wd * w.

The step size is applied exactly once: inside the worker's error feedback for ``none``, ``ef``
and ``ef-scaled``; by the server (eta_t times the aggregate, after server momentum) for
``memory``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import feedback as fb
from .compressors import Compressor, Identity, RowSparse
from .topology import check_topology, has_downlink_compression

MOMENTUM_KINDS = ("none", "gradient", "update")


class WorkerOutput:
    """What the workers' step produced.

    ``message`` is what goes to the server: a dense ``[n, d]`` tensor (zeros off the support), or
    a :class:`~gradsparse.compressors.RowSparse` for fixed-count compressors. The dense views
    ``sent``, ``support`` and ``accumulated`` (the vector the compressor saw: a, p or v) are built
    on first use, so the hot path stays O(n k) when nobody asks for them.
    """

    def __init__(self, state, *, sent=None, support=None, accumulated=None, sparse=None, acc_values=None, live=None):
        self.state = state
        self.sparse: RowSparse | None = sparse
        self._sent, self._support, self._acc, self._acc_values = sent, support, accumulated, acc_values
        # set by engines that update the memory in place: a one-element list that the engine
        # flips to False when state["e"] is overwritten by the next step
        self._live = live

    @property
    def message(self):
        return self.sparse if self.sparse is not None else self._sent

    @property
    def sent(self) -> torch.Tensor:
        if self._sent is None:
            self._sent = self.sparse.dense()
        return self._sent

    @property
    def support(self) -> torch.Tensor:
        if self._support is None:
            self._support = self.sparse.mask()
        return self._support

    @property
    def accumulated(self) -> torch.Tensor:
        if self._acc is None:
            if self._live is not None and not self._live[0]:
                raise RuntimeError(
                    "this step's accumulated vectors are gone: the engine updated the error-feedback "
                    "memory in place at the next step; read .accumulated before stepping again, or "
                    "build the simulator with in_place_memory=False"
                )
            # off the support the new memory equals the accumulated vector (masking only touches
            # transmitted coordinates); on it, the accumulated values were kept
            self._acc = self.state["e"].clone().scatter_(1, self.sparse.indices, self._acc_values)
        return self._acc


@dataclass
class ServerOutput:
    update: torch.Tensor  # [d] the model moves by -update
    aggregate: torch.Tensor  # [d] sum_q p_q s_q (before momentum / step size / downlink)
    pre_downlink: torch.Tensor  # [d] G (what the downlink compressor saw; == update if none)
    down_support: torch.Tensor | None  # [d] bool support sent down (None: the aggregate itself)
    state: dict


@dataclass
class Algorithm:
    compressor: Compressor = field(default_factory=Identity)
    feedback: str = "ef"
    momentum: str = "none"
    beta: float = 0.0
    nesterov: bool = False
    masking: bool = False
    weight_decay: float = 0.0
    topology: str = "all_to_all"
    down_compressor: Compressor | None = None

    def __post_init__(self) -> None:
        fb.check_kind(self.feedback)
        check_topology(self.topology)
        if self.momentum not in MOMENTUM_KINDS:
            raise ValueError(f"unknown momentum {self.momentum!r}; allowed: {', '.join(MOMENTUM_KINDS)}")
        if not (0.0 <= self.beta < 1.0):
            raise ValueError(f"momentum beta must be in [0, 1), got {self.beta!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if has_downlink_compression(self.topology) and self.down_compressor is None:
            raise ValueError(f"topology {self.topology!r} needs a downlink compressor")
        if self.topology == "downlink_only":
            # workers send alpha * g uncompressed, no worker memory (paper 003 Alg. 10/11)
            self.compressor = Identity()
            self.feedback = "none"
        if self.masking and self.momentum != "update":
            raise ValueError("momentum-factor masking applies to momentum 'update' only")

    # ---- state ------------------------------------------------------------------------
    def init_worker_state(self, n: int, d: int, dtype=torch.float32) -> dict:
        st: dict = {}
        if fb.has_memory(self.feedback):
            st["e"] = torch.zeros(n, d, dtype=dtype)
        if self.momentum == "update":
            st["m"] = torch.zeros(n, d, dtype=dtype)
        return st

    def init_server_state(self, d: int, dtype=torch.float32) -> dict:
        st: dict = {}
        if self.momentum == "gradient":
            st["m"] = torch.zeros(d, dtype=dtype)
        if has_downlink_compression(self.topology):
            st["delta"] = torch.zeros(d, dtype=dtype)
        return st

    @property
    def lr_inside(self) -> bool:
        return fb.lr_inside(self.feedback)

    # ---- worker side ------------------------------------------------------------------
    def worker_step(
        self,
        grads: torch.Tensor,
        params: torch.Tensor,
        state: dict,
        step: int,
        lr: float,
        workers: torch.Tensor | None = None,
    ) -> WorkerOutput:
        """grads [n, d]; params [d] (the model the gradients were taken at, for weight decay)."""
        g = grads
        if self.weight_decay:
            g = g + self.weight_decay * params
        new_state = dict(state)
        if self.momentum == "update":
            m = self.beta * state["m"] + g
            new_state["m"] = m
            g = g + self.beta * m if self.nesterov else m
        if self.compressor.fixed_count:
            rs, e, acc_vals, acc = fb.feedback_step_sparse(
                self.feedback, self.compressor, g, state.get("e"), lr, step, workers
            )
            if e is not None:
                new_state["e"] = e
            if self.masking:  # m and e are fresh tensors here: zero them in place, O(n k)
                new_state["m"].scatter_(1, rs.indices, 0.0)
                if e is not None:
                    e.scatter_(1, rs.indices, 0.0)
            return WorkerOutput(new_state, sparse=rs, acc_values=acc_vals, accumulated=acc)
        sent, support, e, acc = fb.feedback_step(
            self.feedback, self.compressor, g, state.get("e"), lr, step, workers
        )
        if e is not None:
            new_state["e"] = e
        if self.masking:
            new_state["m"] = new_state["m"].masked_fill(support, 0.0)
            if e is not None:
                new_state["e"] = new_state["e"].masked_fill(support, 0.0)
        return WorkerOutput(new_state, sent=sent, support=support, accumulated=acc)

    # ---- worker side, accumulation done by the engine ----------------------------------
    @property
    def accumulates_in_place(self) -> bool:
        """True when the worker step is exactly: a = e + c g (c from
        :meth:`accumulation_scale`), s = C(a), e <- a - s, with a fixed-count compressor — so an
        engine may form a in the memory buffer itself and call :meth:`worker_step_accumulated`."""
        return (
            self.feedback in ("ef", "memory")
            and self.compressor.fixed_count
            and self.momentum != "update"
            and not self.weight_decay
        )

    def accumulation_scale(self, lr: float) -> float:
        return fb.accumulation_scale(self.feedback, lr)

    def worker_step_accumulated(
        self, acc: torch.Tensor, state: dict, step: int, lr: float, workers: torch.Tensor | None = None, live=None
    ) -> WorkerOutput:
        """The worker step when the engine has already overwritten the memory with the
        accumulated vectors, ``acc = state["e"] = e + c g`` ([n, d], updated in place to the new
        memory). Same result as :meth:`worker_step` on g (up to the rounding of forming e + c g)."""
        if not self.accumulates_in_place:
            raise ValueError(f"worker_step_accumulated does not apply to {self.describe()}")
        rs, acc_vals = fb.finish_accumulated_(self.compressor, acc, step, workers)
        new_state = dict(state)
        new_state["e"] = acc
        return WorkerOutput(new_state, sparse=rs, acc_values=acc_vals, live=live)

    # ---- server side ------------------------------------------------------------------
    def server_step(
        self,
        sent: torch.Tensor | RowSparse,
        weights: torch.Tensor,
        state: dict,
        step: int,
        lr: float,
    ) -> ServerOutput:
        """Messages (dense [m, d] or RowSparse), weights [m] (p_q) -> update to subtract."""
        if isinstance(sent, RowSparse):
            agg = sent.weighted_sum(weights)
        else:
            agg = weights.to(sent.dtype) @ sent
        new_state = dict(state)
        direction = agg
        if self.momentum == "gradient":
            m = self.beta * state["m"] + agg
            new_state["m"] = m
            direction = agg + self.beta * m if self.nesterov else m
        if not self.lr_inside:
            direction = lr * direction
        if not has_downlink_compression(self.topology):
            return ServerOutput(direction, agg, direction, None, new_state)
        G = direction + state["delta"]
        out, down = self.down_compressor(G.unsqueeze(0), step, torch.tensor([-1]))
        out, down = out[0], down[0]
        new_state["delta"] = G - out
        return ServerOutput(out, agg, G, down, new_state)

    def describe(self) -> str:
        parts = [self.compressor.describe(), f"feedback={self.feedback}", f"topology={self.topology}"]
        if self.down_compressor is not None:
            parts.append(f"down={self.down_compressor.describe()}")
        if self.momentum != "none":
            parts.append(f"momentum={self.momentum}(beta={self.beta}{', nesterov' if self.nesterov else ''})")
        return ", ".join(parts)
