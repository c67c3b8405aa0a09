"""Non-finite detection on the engine interface (the ``on_nonfinite`` policy).

:func:`find_nonfinite` looks at everything an engine holds after a step — the model, the
workers' error-feedback memories and momentum, the server's momentum and downlink memory, and
the values of the step's messages — and returns a :class:`NonFinite` naming the first
non-finite one (what, worker, segment via the :class:`~gradsparse.segments.Layout`, step), or
``None``. Memories matter on their own: NaN never passes a hard threshold (``|x| >= lambda`` is
false), so a memory can fill with NaN while the model stays finite.

Cost: one reduction per tensor (``x.sum()``: a finite sum implies every entry is finite, since a
NaN or an infinity makes the sum non-finite); only when a sum is not finite (a real non-finite
value, or an overflow of the sum of huge finite values) is the exact, allocating
``isfinite`` check run to locate it. With exact top-k or identity the [N, d] memories need no
scan at all: the step's message (N k values) proves them finite (see
:func:`_message_reveals_memory`). ``benchmarks/bench_runs.py`` prints the per-step cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NonFinite", "find_nonfinite", "first_nonfinite", "ON_NONFINITE"]

#: the values of the config key ``on_nonfinite``
ON_NONFINITE = ("stop", "skip")


@dataclass
class NonFinite:
    what: str  # model | memory | momentum | server momentum | server downlink memory | message | loss
    step: int
    worker: int | None = None
    segment: str | None = None
    index: int | None = None  # position inside the segment
    value: float | None = None

    def describe(self) -> str:
        where = []
        if self.worker is not None:
            where.append(f"worker {self.worker}")
        if self.segment is not None:
            where.append(f"segment {self.segment!r}" + (f" entry {self.index}" if self.index is not None else ""))
        at = f" ({', '.join(where)})" if where else ""
        val = f" = {self.value}" if self.value is not None else ""
        return f"non-finite {self.what}{at}{val} at step {self.step}"


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite, in about one pass: a sum over entries is NaN or
    infinite when any entry is (inf and NaN survive any further addition), so a finite sum proves
    it; only a non-finite sum (a NaN, an infinity, or an overflow of large finite entries) runs the
    exact entry-wise check. ``isfinite(x).all()`` alone is about 25x slower on 10M entries."""
    if x.numel() == 0:
        return True
    if not x.is_floating_point():
        return True
    s = x.sum(dtype=torch.float64) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
    if bool(torch.isfinite(s)):
        return True
    return bool(torch.isfinite(x).all())  # the sum may have overflowed: exact check


def _locate(x: torch.Tensor, layout) -> tuple[int | None, str | None, int | None, float]:
    """(row, segment, index in segment, value) of the first non-finite entry of [d] or [n, d]."""
    bad = ~torch.isfinite(x)
    rows = x if x.dim() == 2 else x.reshape(1, -1)
    badr = bad.reshape(rows.shape)
    q = int(torch.nonzero(badr.any(dim=1))[0, 0])
    j = int(torch.nonzero(badr[q])[0, 0])
    value = float(rows[q, j])
    segment, index = None, j
    if layout is not None and rows.shape[1] == layout.d:
        for name, a, b in layout.bounds():
            if a <= j < b:
                segment, index = name, j - a
                break
    return (q if x.dim() == 2 else None), segment, index, value


def first_nonfinite(what: str, x: torch.Tensor | None, step: int, layout=None) -> NonFinite | None:
    """A :class:`NonFinite` for the first non-finite entry of ``x`` (``[d]`` or ``[n, d]``), else None."""
    if x is None or all_finite(x):
        return None
    q, segment, index, value = _locate(x, layout)
    return NonFinite(what, step, q, segment, index, value)


def _message_reveals_memory(engine, rec) -> bool:
    """Whether a finite message proves the memories and the accumulated vectors finite this step.

    It does when every row of the step's message is an exact top-k (or identity) of the worker's
    accumulated vector a with k >= 1 in every segment: a non-finite entry of a ranks above every
    finite one (NaN above +inf above all magnitudes), so it is sent; and when a is finite the new
    memory (a - s off and on the support) is finite. The memories before the step are finite by
    the previous step's check (the runner checks everything fully on a run's first step)."""
    return rec is not None and engine.alg.compressor.reveals_nonfinite(engine.d)


def _message_nonfinite(msg, step: int, layout) -> NonFinite | None:
    if all_finite(msg.values):
        return None
    bad = int(torch.nonzero(~torch.isfinite(msg.values))[0, 0])
    q = int(torch.searchsorted(msg.offsets[1:], torch.tensor(bad), right=True))
    column = bad - int(msg.offsets[q]) if msg.dense else int(msg.indices[bad])
    segment, index = None, None
    if layout is not None and msg.d == layout.d:
        for name, a, b in layout.bounds():
            if a <= column < b:
                segment, index = name, column - a
                break
    return NonFinite("message", step, q, segment, index, float(msg.values[bad]))


def find_nonfinite(engine, rec=None, step: int | None = None, *, full: bool = False) -> NonFinite | None:
    """The first non-finite value in ``engine``'s state after a step (and in the step record's
    messages), or None. ``step`` defaults to ``engine.t`` (steps done).

    Order of the report: model, memory, momentum, server momentum, server downlink memory,
    gradient (feedback none), message. Where the message proves the memories finite (exact top-k
    or identity, see :func:`_message_reveals_memory`) and ``full`` is false, the O(N d) memory and
    gradient scans are skipped; on any finding the full check runs, so the report is the same."""
    step = engine.t if step is None else step
    if not full and _message_reveals_memory(engine, rec):
        found = _find(engine, rec, step, scan_memory=False)
        return None if found is None else _find(engine, rec, step, scan_memory=True)
    return _find(engine, rec, step, scan_memory=True)


def _find(engine, rec, step: int, *, scan_memory: bool) -> NonFinite | None:
    layout, ws, ss = engine.layout, engine.worker_state, engine.server_state
    checks = [("model", engine.w)]
    if scan_memory:
        checks.append(("memory", None if ws.memory is None else ws.memory.flat))
    checks.append(("momentum", None if ws.momentum is None else ws.momentum.flat))
    checks.append(("server momentum", None if ss.momentum is None else ss.momentum.flat))
    checks.append(("server downlink memory", None if ss.downlink_memory is None else ss.downlink_memory.flat))
    for what, x in checks:
        found = first_nonfinite(what, x, step, layout)
        if found is not None:
            return found
    if rec is not None:
        worker = rec.worker
        # feedback none: a = alpha g (the real asynchronous server holds a decoded message only)
        acc = worker.feedback.accumulated if scan_memory and worker.feedback is not None else None
        if acc is not None:
            found = first_nonfinite("gradient", acc, step, layout)
            if found is not None:
                return found
        return _message_nonfinite(worker.message, step, layout)
    return None
