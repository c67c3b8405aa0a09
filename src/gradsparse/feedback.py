"""Error feedback (memory) at the workers (ALGORITHMS.md §2), as small objects with state.

Each kind is an object with ``init(layout, n) -> memory`` (a
:class:`~gradsparse.segments.SegmentedTensor` of ``[n, d]``, or ``None``) and
``update(g, memory, lr=..., compressor=..., context=...) -> (FeedbackOutput, new memory)``.
``g`` is the vector the worker feeds in (its gradient, or its momentum direction).

- ``none``:      s = C(alpha g)                                    (no memory)
- ``ef``:        a = e + alpha g; s = C(a); e <- a - s             (step inside; papers 000, 003)
- ``ef-scaled``: p = e + gamma g; s = gamma C(p / gamma); e <- p - s   (paper 002)
- ``memory``:    v = u + g; s = C(v); u <- v - s                   (step outside; paper 004
                 M-DSGD, paper 001 phi-MemSGD); the server multiplies the aggregate by eta_t.

Values as sent: every ``update``/``step_in_place_`` takes the wire's ``value_dtype``; the
message's values are what a receiver decodes (:func:`gradsparse.wire.sendable`: rounded to
that dtype), and the memory keeps what rounding took off: ``e <- a - sent``.

One implementation: every kind with a memory forms the accumulated vector ``a = e + c g``
(``c`` = :meth:`accumulation_scale`) and then runs :meth:`compress_accumulated_`, which compresses
``a`` and rewrites only the transmitted entries, ``a[S] <- a[S] - s[S]``, turning the buffer into
the new memory. :meth:`update` does it on a fresh buffer; the in-place entry
:meth:`step_in_place_` does it in the memory buffer itself (the natural path of a DDP hook, and
of the simulator's fast path, which writes ``e + c g`` from its gradient factors and passes
``g = None``). ``sent + new memory == accumulated`` holds exactly off the support and, on it, up
to the rounding of ``a - s`` (exact zero when C keeps values unchanged).

Under staleness (asynchronous engines) the worker's step size and random streams use the step
counter of the model version it computed at; for ``memory`` the step size is the server's, at
its step on arrival (see :mod:`gradsparse.algorithm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .compressors import CompressionContext, Compressor
from .messages import SparseBatch
from .segments import Layout, SegmentedTensor
from .wire import sendable

__all__ = ["FeedbackOutput", "Feedback", "NoFeedback", "ErrorFeedback", "ScaledErrorFeedback", "Memory", "FEEDBACKS", "make_feedback"]


@dataclass
class FeedbackOutput:
    """message: what the worker sends (on the update's scale, or ``v``'s for ``memory``);
    accumulated_values: the accumulated vector (a, p or v) at the message's support, in the
    message's entry order; accumulated: the whole accumulated vector when the kind keeps no
    memory (``none``), else ``None`` (it is the new memory off the support)."""

    message: SparseBatch
    accumulated_values: torch.Tensor
    accumulated: torch.Tensor | None = None

    def accumulated_rows(self, memory: torch.Tensor | None) -> torch.Tensor:
        """The accumulated vectors ``[n, d]``, rebuilt from the new memory off the support."""
        if self.accumulated is not None:
            return self.accumulated
        return self.message.scatter_(memory.clone(), self.accumulated_values)


class Feedback:
    kind: ClassVar[str]
    #: whether the worker's message already includes the step size
    lr_inside: ClassVar[bool] = True
    has_memory: ClassVar[bool] = True

    def init(self, layout: Layout, n: int, dtype=torch.float32) -> SegmentedTensor | None:
        return SegmentedTensor.zeros(layout, n, dtype=dtype) if self.has_memory else None

    def accumulation_scale(self, lr: float) -> float:
        """c in a = e + c g."""
        return lr

    def compress_as_worker(self, a: torch.Tensor, lr: float, compressor: Compressor, context: CompressionContext) -> SparseBatch:
        """C applied to accumulated rows exactly as this kind's workers apply it."""
        return compressor.compress(a, context)

    def update(self, g: torch.Tensor, memory: SegmentedTensor | None, *, lr: float, compressor: Compressor,
               context: CompressionContext, value_dtype: str | None = None) -> tuple[FeedbackOutput, SegmentedTensor | None]:
        """Out of place: a fresh accumulated buffer becomes the new memory."""
        self._check_lr(lr)
        buffer = torch.add(memory.flat, g, alpha=self.accumulation_scale(lr))
        out = self.compress_accumulated_(buffer, lr=lr, compressor=compressor, context=context, value_dtype=value_dtype)
        return out, SegmentedTensor(memory.layout, buffer)

    def step_in_place_(self, memory: SegmentedTensor, g: torch.Tensor | None, *, lr: float, compressor: Compressor,
                       context: CompressionContext, value_dtype: str | None = None) -> FeedbackOutput:
        """In place: memory <- memory + c g (skipped when ``g`` is None: the engine already formed
        it), s = C(memory), memory <- memory - s. Uses the compressor's fused kernel when it has
        one for this input (one pass over the memory; when the wire rounds the values, the kept
        entries then get their rounding error back: memory[S] <- a[S] - sent)."""
        self._check_lr(lr)
        buffer = memory.flat
        if self.fused_allowed:
            fused = compressor.compress_accumulated_(buffer, g, self.accumulation_scale(lr))
            if fused is not None:
                message, accumulated = fused
                sent = sendable(message, value_dtype)
                if sent is not message:
                    sent.scatter_(buffer, accumulated - sent.values)
                return FeedbackOutput(sent, accumulated)
        if g is not None:
            buffer.add_(g, alpha=self.accumulation_scale(lr))
        return self.compress_accumulated_(buffer, lr=lr, compressor=compressor, context=context, value_dtype=value_dtype)

    #: whether a value-preserving fused kernel computes this kind's step (s = C(a) exactly)
    fused_allowed: ClassVar[bool] = True

    def compress_accumulated_(self, buffer: torch.Tensor, *, lr: float, compressor: Compressor,
                              context: CompressionContext, value_dtype: str | None = None) -> FeedbackOutput:
        """``buffer`` holds a = e + c g; compress it and turn it into a - s (transmitted entries
        only; s as sent, i.e. rounded to ``value_dtype``)."""
        message = sendable(self.compress_as_worker(buffer, lr, compressor, context), value_dtype)
        acc = message.gather(buffer)
        message.scatter_(buffer, acc - message.values)
        return FeedbackOutput(message, acc)

    def _check_lr(self, lr: float) -> None:
        pass


class NoFeedback(Feedback):
    """s = C(alpha g): no memory, what is not sent is lost."""

    kind = "none"
    has_memory = False
    fused_allowed = False

    def update(self, g, memory, *, lr, compressor, context, value_dtype=None):
        a = g * lr
        message = sendable(compressor.compress(a, context), value_dtype)
        return FeedbackOutput(message, message.gather(a), accumulated=a), None

    def step_in_place_(self, memory, g, *, lr, compressor, context, value_dtype=None):
        raise ValueError("error feedback 'none' keeps no memory: there is no in-place step")


class ErrorFeedback(Feedback):
    """a = e + alpha g; s = C(a); e <- a - s (papers 000, 003)."""

    kind = "ef"


class ScaledErrorFeedback(Feedback):
    """p = e + gamma g; s = gamma C(p / gamma); e <- p - s (paper 002). Equals ``ef`` for
    scale-invariant compressors (top-k, random-k); for hard-threshold, lambda applies on the
    gradient's scale. Needs gamma > 0 at every step (checked when the run is built)."""

    kind = "ef-scaled"
    fused_allowed = False

    def _check_lr(self, lr):
        if not lr > 0:
            raise ValueError(f"error feedback 'ef-scaled' needs a positive step size, got {lr!r}")

    def compress_as_worker(self, a, lr, compressor, context):
        message = compressor.compress(a / lr, context)
        return message.with_values(message.values * lr)


class Memory(Feedback):
    """v = u + g; s = C(v); u <- v - s; the server applies eta_t to the aggregate (paper 004
    M-DSGD, paper 001 phi-MemSGD)."""

    kind = "memory"
    lr_inside = False

    def accumulation_scale(self, lr):
        return 1.0


#: the one table of error-feedback kinds
FEEDBACKS: dict[str, type[Feedback]] = {c.kind: c for c in (NoFeedback, ErrorFeedback, ScaledErrorFeedback, Memory)}


def make_feedback(kind: str | Feedback) -> Feedback:
    if isinstance(kind, Feedback):
        return kind
    if kind not in FEEDBACKS:
        raise ValueError(f"unknown error feedback {kind!r}; allowed: {', '.join(FEEDBACKS)}")
    return FEEDBACKS[kind]()
