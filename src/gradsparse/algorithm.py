"""One algorithm description, run unchanged by every engine.

An :class:`Algorithm` composes the pieces of ALGORITHMS.md — compressor ∘ error feedback ∘
momentum ∘ topology — in this order::

    worker q:  g <- g + wd * w                          weight decay, before compression
               g <- momentum_update(g)                  worker momentum (update compression)
               s_q, e_q <- feedback(g, e_q; C_up)       error feedback around the uplink compressor
               [mask m_q, e_q at the support of s_q]    momentum-factor masking (optional)
    server:    A = sum_q p_q f(tau_q) s_q               weights x staleness dampening
               D = momentum_gradient(A)                 server momentum (gradient compression)
               U = D            (ef, ef-scaled, none: the step size is inside s_q)
               U = eta_t * D    (memory: the step size is applied here)
               (U', message) <- topology(A, U, delta)   what is sent down; workers apply w <- w - U'

and exposes two steps with explicit, named state (:class:`WorkerState`, :class:`ServerState`):

* :meth:`worker_step` — ``n`` workers' gradients (rows ``[n, d]``) -> their messages (one
  :class:`~gradsparse.messages.SparseBatch`), each message's exact wire size and the new state.
  An engine with one worker per process calls it with ``n = 1``.
* :meth:`server_step` — the messages that arrived, their weights and (under staleness) the
  versions they were computed at -> the update to apply, the downlink message and its exact
  size, the new server state. For all-to-all every worker runs it on the gathered messages.

:meth:`worker_step_in_place` is the one in-place worker entry (``ef``/``ef-scaled``/``memory``
without worker momentum or weight decay): the memory buffer itself becomes e + c g, is
compressed, and keeps a - s. It is the natural path of a DDP hook, and the simulator's fast
path (which forms e + c g from its gradient factors and passes ``grads=None``).

Step counters under staleness (asynchronous engines). A worker forms its message at the
model version tau it holds: its step size alpha_tau (``none``/``ef``/``ef-scaled``: the step is
inside the message) and its random-k stream (``uplink``, step tau, its worker id) use tau. The
server, at step t on arrival, uses t for everything it does: eta_t (``memory`` feedback, step
outside), the staleness t - tau, and the downlink random stream (``downlink``, step t).
Synchronous engines have tau = t.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from . import wire
from .compressors import CompressionContext, Compressor, Identity
from .feedback import Feedback, FeedbackOutput, make_feedback
from .messages import SparseBatch
from .momentum import Momentum, make_momentum
from .segments import Layout, SegmentedTensor
from .staleness import StalenessDampening
from .topology import Topology, make_topology

#: config names of the wire's value dtypes (``gradsparse.wire.VALUE_DTYPES``: float32, float16,
#: bfloat16, float64)
VALUE_DTYPE_NAMES = ("fp32", "fp16", "bf16", "fp64")

__all__ = ["VALUE_DTYPE_NAMES", "Algorithm", "WorkerState", "ServerState", "WorkerStepOutput", "ServerStepOutput"]


@dataclass
class WorkerState:
    """The workers' state, rows ``[n, d]`` keyed by segment: error-feedback memory (``None``
    for feedback ``none``) and momentum (``None`` unless momentum ``update``); plus the state of
    a stateful uplink compressor (a dict of plain tensors with one row per worker, else ``None``)."""

    memory: SegmentedTensor | None = None
    momentum: SegmentedTensor | None = None
    compressor: dict[str, torch.Tensor] | None = None

    def rows(self, index) -> "WorkerState":
        memory, momentum = (None if s is None else s.rows(index) for s in (self.memory, self.momentum))
        compressor = None if self.compressor is None else {k: v[index] for k, v in self.compressor.items()}
        return WorkerState(memory, momentum, compressor)

    def clone(self) -> "WorkerState":
        memory, momentum = (None if s is None else s.clone() for s in (self.memory, self.momentum))
        compressor = None if self.compressor is None else {k: v.clone() for k, v in self.compressor.items()}
        return WorkerState(memory, momentum, compressor)

    def copy_(self, other: "WorkerState") -> "WorkerState":
        """Write ``other``'s memory, momentum and compressor state into this state's tensors
        (views of an engine's buffers stay current); returns self."""
        for mine, new in ((self.memory, other.memory), (self.momentum, other.momentum)):
            if mine is not None and new is not mine:
                mine.flat.copy_(new.flat)
        if self.compressor is not None and other.compressor is not self.compressor:
            for k, v in other.compressor.items():
                self.compressor[k].copy_(v)
        return self

    @staticmethod
    def cat(states: list["WorkerState"]) -> "WorkerState":
        def cat(parts):
            if parts[0] is None:
                return None
            return SegmentedTensor(parts[0].layout, torch.cat([p.flat for p in parts]))

        compressor = None
        if states[0].compressor is not None:
            compressor = {k: torch.cat([s.compressor[k] for s in states]) for k in states[0].compressor}
        return WorkerState(cat([s.memory for s in states]), cat([s.momentum for s in states]), compressor)


@dataclass
class ServerState:
    """Server state, vectors ``[d]`` keyed by segment: gradient momentum, downlink memory delta."""

    momentum: SegmentedTensor | None = None
    downlink_memory: SegmentedTensor | None = None


class FactoredGradients(Protocol):
    """The n workers' gradients in a form cheaper than ``[n, d]`` (e.g. per Linear layer the
    output gradients and the inputs, :class:`gradsparse.engines.grouped_grad.GradientFactors`)."""

    def write_into(self, out: torch.Tensor, alpha: float = 1.0, accumulate: bool = False) -> torch.Tensor:
        """``out = alpha G`` (or ``out += alpha G``) for the ``[n, d]`` gradients G."""

    def dense(self, d: int, dtype: torch.dtype) -> torch.Tensor:
        """G as a new ``[n, d]`` tensor."""


@dataclass
class WorkerStepOutput:
    message: SparseBatch  # what the workers send, one row each
    #: int64 [n]: exact wire size of each row's message (read it as ``nbytes``); None: sized from
    #: the message in ``value_dtype`` when first read (the DDP hook's channel counts what it
    #: sends and never reads it: sizing 20 messages cost it 12 ms a step on 10M parameters)
    _nbytes: torch.Tensor | None
    state: WorkerState
    feedback: FeedbackOutput
    #: [n, d] the vector fed to error feedback (gradient + weight decay, or the momentum
    #: direction); None on the in-place path, where it is the engine's gradient
    feedback_input: torch.Tensor | None = None
    #: True when the step ran in the memory's buffer (:meth:`Algorithm.worker_step_in_place`):
    #: the accumulated vectors are then rebuilt from that buffer and change with it
    in_place: bool = False
    value_dtype: str = "fp32"  # the dtype the message's values travel in (for ``nbytes``)

    @property
    def nbytes(self) -> torch.Tensor:
        if self._nbytes is None:
            self._nbytes = wire.encoded_nbytes(self.message, value_dtype=self.value_dtype)
        return self._nbytes

    def accumulated(self) -> torch.Tensor:
        """[n, d] the vectors the compressor saw (a, p or v), rebuilt from the new memory."""
        memory = self.state.memory.flat if self.state.memory is not None else None
        return self.feedback.accumulated_rows(memory)


@dataclass
class ServerStepOutput:
    update: torch.Tensor  # [d] the model moves by -update
    aggregate: torch.Tensor  # [d] A = sum_q p_q f(tau_q) s_q
    pre_downlink: torch.Tensor  # [d] what the downlink compressor saw (G), else the update
    message: SparseBatch | None  # the one message the server sends (None for all-to-all)
    nbytes: int  # its exact wire size (0 when there is none)
    state: ServerState
    weights: torch.Tensor  # the weights actually used (p_q times the staleness factor)


class Algorithm:
    """compressor ∘ error feedback ∘ momentum ∘ topology (see the module docstring).

    Pieces are objects or kind names from their tables (``COMPRESSORS``, ``FEEDBACKS``,
    ``MOMENTA``, ``TOPOLOGIES``). ``value_dtype`` (fp32, fp16, bf16, fp64) is the dtype every
    message's values travel in: a message's values are what a receiver decodes from its frames
    (:func:`gradsparse.wire.round_values`: rounded to that dtype, finite values beyond its range
    saturated), so the bytes charged and the values computed with agree. A worker's memory keeps
    the rounding error (e <- a - sent), the server's downlink memory likewise; the aggregate that
    ``ps_uplink`` sends down is rounded before anyone applies it. With values already in that
    dtype (float32 models, fp32) nothing changes.
    """

    def __init__(
        self,
        compressor: Compressor | None = None,
        feedback: Feedback | str = "ef",
        momentum: Momentum | str = "none",
        topology: Topology | str = "all_to_all",
        down_compressor: Compressor | None = None,
        weight_decay: float = 0.0,
        value_dtype: str = "fp32",
        staleness: StalenessDampening | None = None,
        on_nonfinite: str = "stop",
    ) -> None:
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        #: ``skip``: a worker whose accumulated vector or message is non-finite sends an empty row
        #: and keeps its memory (and momentum) from before the step; ``stop``: nothing here (the
        #: runner stops at the first non-finite value, :mod:`gradsparse.divergence`)
        self.on_nonfinite = on_nonfinite
        #: messages dropped by the ``skip`` policy so far (every engine's worker steps count here)
        self.skipped_messages = 0
        self.compressor = compressor if compressor is not None else Identity()
        self.feedback = make_feedback(feedback)
        self.momentum = make_momentum(momentum)
        self.topology = make_topology(topology, down_compressor)
        self.topology.check_uplink(self.compressor, self.feedback.kind)
        if not (weight_decay >= 0.0) or weight_decay == float("inf"):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)
        if value_dtype not in VALUE_DTYPE_NAMES:
            raise ValueError(f"value_dtype must be one of {list(VALUE_DTYPE_NAMES)}, got {value_dtype!r}")
        self.value_dtype = value_dtype
        self.staleness = staleness or StalenessDampening()

    @property
    def down_compressor(self) -> Compressor | None:
        return self.topology.down_compressor

    @property
    def lr_inside(self) -> bool:
        return self.feedback.lr_inside

    # ---- state ------------------------------------------------------------------------
    def init_worker_state(self, layout: Layout, n: int, dtype=torch.float32) -> WorkerState:
        worker_momentum = self.momentum.init(layout, n, dtype=dtype) if self.momentum.side == "worker" else None
        return WorkerState(self.feedback.init(layout, n, dtype), worker_momentum, self.compressor.init_state(layout, n))

    def init_server_state(self, layout: Layout, dtype=torch.float32) -> ServerState:
        server_momentum = self.momentum.init(layout, dtype=dtype) if self.momentum.side == "server" else None
        return ServerState(server_momentum, self.topology.init(layout, dtype))

    def kinds(self) -> dict:
        return {"feedback": self.feedback.kind, "momentum": self.momentum.kind, "topology": self.topology.kind}

    def state_dict(self, worker: WorkerState, server: ServerState, *, layout: Layout, n_workers: int) -> dict:
        """Plain tensors keyed by segment, with what they belong to (loads under
        ``torch.load(weights_only=True)``)."""

        def segments(s):
            return None if s is None else s.to_segments()

        return {
            "kinds": self.kinds(),
            "n_workers": int(n_workers),
            "segments": layout.describe(),
            "worker": {"memory": segments(worker.memory), "momentum": segments(worker.momentum),
                       "compressor": None if worker.compressor is None else {k: v.clone() for k, v in worker.compressor.items()}},
            "server": {"momentum": segments(server.momentum), "downlink_memory": segments(server.downlink_memory)},
        }

    def load_state_dict(self, sd: dict, *, layout: Layout, n_workers: int) -> tuple[WorkerState, ServerState]:
        """Validate a :meth:`state_dict` against this algorithm, the model and the worker count."""
        for piece, kind in self.kinds().items():
            if sd["kinds"].get(piece) != kind:
                raise ValueError(
                    f"checkpoint was written with {piece} {sd['kinds'].get(piece)!r}, this run has {kind!r}"
                )
        if sd["n_workers"] != n_workers:
            raise ValueError(f"checkpoint holds the state of {sd['n_workers']} workers, this run has {n_workers}")
        if sd["segments"] != layout.describe():
            raise ValueError(
                f"checkpoint model segments {sd['segments']['names']} (sizes {sd['segments']['sizes']}) "
                f"do not match this model's {list(layout.names)} (sizes {list(layout.sizes)})"
            )
        expected = self.init_worker_state(layout, n_workers), self.init_server_state(layout)

        def load(part, name, template):
            seg = sd[part][name]
            if (seg is None) != (template is None):
                raise ValueError(f"checkpoint {part} {name} is {'missing' if seg is None else 'present'}, "
                                 f"this algorithm {'needs' if template is not None else 'keeps no'} it")
            if seg is None:
                return None
            st = SegmentedTensor.from_segments(layout, seg, what=f"checkpoint {part} {name}")
            if tuple(st.flat.shape) != tuple(template.flat.shape):
                raise ValueError(f"checkpoint {part} {name} has shape {tuple(st.flat.shape)}, expected {tuple(template.flat.shape)}")
            return SegmentedTensor(layout, st.flat.clone())

        w, s = expected
        compressor = None
        if (sd["worker"].get("compressor") is None) != (w.compressor is None):
            raise ValueError("checkpoint and this algorithm disagree on whether the uplink compressor keeps state")
        if w.compressor is not None:
            got = sd["worker"]["compressor"]
            if set(got) != set(w.compressor) or any(tuple(got[k].shape) != tuple(v.shape) for k, v in w.compressor.items()):
                raise ValueError(
                    f"checkpoint compressor state {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in got.items())}}} does not "
                    f"match this compressor's {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in w.compressor.items())}}}"
                )
            compressor = {k: v.clone() for k, v in got.items()}
        return (
            WorkerState(load("worker", "memory", w.memory), load("worker", "momentum", w.momentum), compressor),
            ServerState(load("server", "momentum", s.momentum), load("server", "downlink_memory", s.downlink_memory)),
        )

    # ---- worker side ------------------------------------------------------------------
    def worker_update_(
        self,
        grads: torch.Tensor | FactoredGradients | None,
        params: torch.Tensor | None,
        state: WorkerState,
        *,
        step: int,
        lr: float,
        workers: torch.Tensor | None = None,
        in_place: bool = True,
        rebind: bool = False,
    ) -> WorkerStepOutput:
        """The worker step of rows ``state`` (``[n, d]`` views of an engine's buffers, or the
        whole buffers), the one entry every engine and the DDP hook call; ``state`` holds the
        new memory, momentum and compressor state afterwards, and the output's ``state`` is
        ``state`` itself.

        It takes the in-place step (memory <- memory + c g, s = C(memory), memory <- memory - s
        in the memory's own buffer; :meth:`worker_step_in_place`) when
        :meth:`takes_in_place_step` says so (the algorithm allows it: memory, no worker momentum,
        no weight decay, not ``on_nonfinite: skip``; and the caller does: ``in_place`` False
        under stagewise learning, whose proximal term the engine adds to the gradients); otherwise the
        out-of-place step (:meth:`worker_step`, which also applies the skip policy), whose new
        state is then written into ``state`` (``rebind``: put in its place instead, without a
        copy -- for a caller whose ``state`` holds whole buffers of its own that nothing else views;
        the vectorized simulator, where copying 100 x 50,890 memories back doubled the step time).
        ``grads``: the ``[n, d]`` gradients, or the gradients in factored form
        (:class:`FactoredGradients`, e.g. the vectorized simulator's grouped Linear-layer factors): the in-place step then adds ``c g`` from the
        factors straight into the memory (no ``[n, d]`` gradient tensor), the out-of-place step
        expands them first. ``params``: the model the gradients were taken at (weight decay reads
        it). The output's ``in_place`` says which step ran."""
        if self.takes_in_place_step(in_place):
            if grads is not None and not isinstance(grads, torch.Tensor):
                grads.write_into(state.memory.flat, alpha=self.feedback.accumulation_scale(lr), accumulate=True)
                grads = None
            return self.worker_step_in_place(grads, state, step=step, lr=lr, workers=workers)
        if grads is None:
            raise ValueError(f"the out-of-place worker step of {self.describe()} needs the gradients (grads is None)")
        if not isinstance(grads, torch.Tensor):
            like = params if params is not None else state.memory.flat
            grads = grads.dense(like.shape[-1], like.dtype)
        out = self.worker_step(grads, params, state, step=step, lr=lr, workers=workers)
        if rebind:
            state.memory, state.momentum, state.compressor = out.state.memory, out.state.momentum, out.state.compressor
        else:
            state.copy_(out.state)
        return dataclasses.replace(out, state=state)

    def worker_step(
        self,
        grads: torch.Tensor,
        params: torch.Tensor | None,
        state: WorkerState,
        *,
        step: int,
        lr: float,
        workers: torch.Tensor | None = None,
    ) -> WorkerStepOutput:
        """grads ``[n, d]``; params ``[d]`` (the model the gradients were taken at, for weight decay)."""
        g = grads
        if self.weight_decay:
            g = g + self.weight_decay * params
        momentum_state = state.momentum
        if self.momentum.side == "worker":
            g, momentum_state = self.momentum.update(g, state.momentum)
        context = CompressionContext(step, workers, "uplink")
        compressor = self.compressor.for_step(state.compressor, context)
        out, memory = self.feedback.update(g, state.memory, lr=lr, compressor=compressor, context=context,
                                           value_dtype=self.value_dtype)
        if self.on_nonfinite == "skip":
            out, memory, momentum_state = self._skip_nonfinite(out, memory, momentum_state, state)
        if self.momentum.masking:
            self.momentum.mask_(momentum_state, out.message, memory)  # fresh tensors: safe in place
        nbytes = self.message_nbytes(out.message) if state.compressor is not None else None  # else sized when read
        compressor_state = self.compressor.observe(state.compressor, out.message, nbytes, context)
        return WorkerStepOutput(out.message, nbytes, WorkerState(memory, momentum_state, compressor_state), out, g,
                                value_dtype=self.value_dtype)

    def _skip_nonfinite(self, out: FeedbackOutput, memory, momentum_state, before: WorkerState):
        """The ``skip`` policy on an out-of-place worker step: rows whose new memory, message
        values or (feedback ``none``) accumulated vector are non-finite send nothing and keep
        their memory and momentum from ``before``. Cost when all is finite: one sum per tensor."""
        from .divergence import all_finite

        parts = [out.message.values]
        if memory is not None:
            parts.append(memory.flat)
        if out.accumulated is not None:
            parts.append(out.accumulated)
        if all(all_finite(x) for x in parts):
            return out, memory, momentum_state
        msg = out.message
        n = msg.n
        bad = torch.zeros(n, dtype=torch.bool)
        bad_entries = ~torch.isfinite(msg.values)
        if bool(bad_entries.any()):
            bad[msg.row_ids()[bad_entries]] = True
        for rows in (None if memory is None else memory.flat, out.accumulated):
            if rows is not None:
                bad |= ~torch.isfinite(rows).all(dim=1)
        keep = ~bad[msg.row_ids()]
        counts = msg.counts.masked_fill(bad, 0)
        offsets = torch.zeros(n + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=offsets[1:])
        new_msg = SparseBatch(msg.d, offsets, msg.values[keep], msg.indices[keep], msg.seeds, False,
                              msg.sorted_rows, None)
        accumulated = out.accumulated
        if accumulated is not None:
            accumulated = accumulated.clone()
            accumulated[bad] = 0.0
        out = FeedbackOutput(new_msg, out.accumulated_values[keep], accumulated)
        if memory is not None:
            memory.flat[bad] = before.memory.flat[bad]
        if momentum_state is not None and before.momentum is not None:
            momentum_state = SegmentedTensor(momentum_state.layout, momentum_state.flat.clone())
            momentum_state.flat[bad] = before.momentum.flat[bad]
        self.skipped_messages += int(bad.sum())
        return out, memory, momentum_state

    @property
    def supports_in_place(self) -> bool:
        """Whether this algorithm's worker step can run in the memory's buffer (memory, no worker
        momentum, no weight decay; and not under ``on_nonfinite: skip``, which needs the memory
        from before the step to restore a skipped worker)."""
        return self._in_place_applies and self.on_nonfinite != "skip"

    def takes_in_place_step(self, in_place: bool = True) -> bool:
        """Whether :meth:`worker_update_` called with ``in_place`` takes the in-place step (the
        one rule; engines ask it only to report what ran, never to choose a path)."""
        return bool(in_place) and self.supports_in_place

    @property
    def _in_place_applies(self) -> bool:
        return self.feedback.has_memory and self.momentum.side != "worker" and not self.weight_decay

    def worker_step_in_place(
        self,
        grads: torch.Tensor | None,
        state: WorkerState,
        *,
        step: int,
        lr: float,
        workers: torch.Tensor | None = None,
    ) -> WorkerStepOutput:
        """memory <- memory + c g (skipped when ``grads`` is None: the engine wrote it), s = C(memory),
        memory <- memory - s, all in ``state.memory``'s buffer. Same result as :meth:`worker_step`
        (up to the rounding of forming e + c g). The returned output rebuilds its accumulated
        vectors from that buffer, so read them before the buffer changes again."""
        if not self._in_place_applies:
            raise ValueError(f"the in-place worker step does not apply to {self.describe()}")
        context = CompressionContext(step, workers, "uplink")
        compressor = self.compressor.for_step(state.compressor, context)
        if self.on_nonfinite == "skip":
            if grads is None:
                raise ValueError("on_nonfinite 'skip' needs the memory from before the step: pass grads "
                                 "(the engine must not form e + c g in the memory itself)")
            before = WorkerState(SegmentedTensor(state.memory.layout, state.memory.flat.clone()))
            out = self.feedback.step_in_place_(state.memory, grads, lr=lr, compressor=compressor, context=context,
                                               value_dtype=self.value_dtype)
            out, _, _ = self._skip_nonfinite(out, state.memory, None, before)
        else:
            out = self.feedback.step_in_place_(state.memory, grads, lr=lr, compressor=compressor, context=context,
                                               value_dtype=self.value_dtype)
        nbytes = None  # sized when read, unless the compressor observes it now
        if state.compressor is not None:
            nbytes = self.message_nbytes(out.message)
            new = self.compressor.observe(state.compressor, out.message, nbytes, context)
            for k, v in new.items():  # in place too, so views of the engine's state stay current
                state.compressor[k].copy_(v)
        return WorkerStepOutput(out.message, nbytes, state, out, None, in_place=True, value_dtype=self.value_dtype)

    def message_nbytes(self, message: SparseBatch) -> torch.Tensor:
        """Exact wire size of each row (the wire's ``auto`` rule: a row whose sparse frame would be
        larger than dense is sent dense and charged the dense size)."""
        return wire.encoded_nbytes(message, value_dtype=self.value_dtype)

    # ---- server side ------------------------------------------------------------------
    def server_step(
        self,
        message: SparseBatch,
        state: ServerState,
        *,
        step: int,
        lr: float,
        weights: torch.Tensor,
        versions: torch.Tensor | None = None,
        send_downlink: bool = True,
        aggregate: torch.Tensor | None = None,
    ) -> ServerStepOutput:
        """Messages (one row each), weights p_q, optional versions -> update to subtract.

        ``send_downlink=False``: an engine whose server sends something else (the asynchronous
        engine sends each worker the model) skips forming an uncompressed topology's message
        (``ps_uplink``'s aggregate); a compressed downlink is always formed (it is the update).
        ``aggregate``: A = sum_q p_q s_q as a collective delivered it (``sharded``, ``allreduce``:
        summed by the transport, rounded to the value dtype); ``message`` is then only recorded."""
        if versions is not None:
            factor = self.staleness.factor(step - versions.to(torch.long))
            weights = weights * factor.to(weights.dtype)
        if aggregate is None:
            aggregate = message.weighted_sum(weights)
            if self.topology.sends_aggregate:  # what the workers will decode: everyone applies that
                aggregate = wire.round_values(aggregate, self.value_dtype)
        momentum_state = state.momentum
        direction = aggregate
        if self.momentum.side == "server":
            direction, momentum_state = self.momentum.update(aggregate, state.momentum)
        update = direction if self.lr_inside else lr * direction
        if send_downlink or self.topology.compresses_downlink:
            applied, down_message, downlink_memory = self.topology.downlink(
                aggregate, update, state.downlink_memory, CompressionContext(step, None, "downlink"),
                self.value_dtype,
            )
        else:
            applied, down_message, downlink_memory = update, None, state.downlink_memory
        nbytes = int(self.message_nbytes(down_message)[0]) if down_message is not None else 0
        pre = update + state.downlink_memory.flat if self.topology.compresses_downlink else update
        return ServerStepOutput(applied, aggregate, pre, down_message, nbytes, ServerState(momentum_state, downlink_memory), weights)

    def describe(self) -> str:
        parts = [self.compressor.describe(), f"feedback={self.feedback.kind}", f"topology={self.topology.describe()}"]
        if self.momentum.kind != "none":
            parts.append(f"momentum={self.momentum.describe()}")
        if self.weight_decay:
            parts.append(f"weight_decay={self.weight_decay:g}")
        if self.staleness.kind != "none":
            parts.append(f"staleness={self.staleness.describe()}")
        return ", ".join(parts)
