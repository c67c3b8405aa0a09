"""Error feedback (memory) at the workers (ALGORITHMS.md §2).

All functions act on a batch of workers: ``g`` and the memory ``e`` have shape ``[n, d]``.
Each returns ``(sent, support, new_e, accumulated)`` where ``accumulated`` is the vector that
was handed to the compressor's rule (``a``, ``p`` or ``v`` in the formulas) — the diagnostics
of §7 need it — and ``sent + new_e == accumulated`` holds exactly (for ``ef-scaled`` up to the
rounding of ``gamma * C(p / gamma)``).

- ``none``:      s = C(alpha g)                                    (no memory)
- ``ef``:        a = e + alpha g; s = C(a); e <- a - s             (step inside; papers 000, 003)
- ``ef-scaled``: p = e + gamma g; s = gamma C(p / gamma); e <- p - s   (paper 002)
- ``memory``:    v = u + g; s = C(v); u <- v - s                   (step outside; paper 004
                 M-DSGD, paper 001 phi-MemSGD); the server then multiplies by eta_t.
"""

from __future__ import annotations

import torch

from .compressors import Compressor

FEEDBACK_KINDS = ("none", "ef", "ef-scaled", "memory")


def lr_inside(kind: str) -> bool:
    """Whether the worker's message already includes the step size."""
    check_kind(kind)
    return kind != "memory"


def check_kind(kind: str) -> None:
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"unknown error feedback {kind!r}; allowed: {', '.join(FEEDBACK_KINDS)}")


def has_memory(kind: str) -> bool:
    return kind != "none"


def feedback_step(
    kind: str,
    compressor: Compressor,
    g: torch.Tensor,
    e: torch.Tensor | None,
    lr: float,
    step: int = 0,
    workers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One worker-side error-feedback step for rows ``g`` with memory ``e``.

    Returns (sent, support mask, new memory (None for ``none``), accumulated vector).
    """
    if kind == "none":
        a = lr * g
        s, m = compressor(a, step, workers)
        return s, m, None, a
    if e is None:
        raise ValueError(f"error feedback {kind!r} needs a memory tensor")
    if kind == "ef":
        a = e + lr * g
        s, m = compressor(a, step, workers)
        return s, m, a - s, a
    if kind == "ef-scaled":
        if lr <= 0:
            raise ValueError(f"ef-scaled needs a positive step size, got {lr!r}")
        p = e + lr * g
        c, m = compressor(p / lr, step, workers)
        s = lr * c
        # keep sent + memory == p exactly on the support and off it
        new_e = torch.where(m, p - s, p)
        return s, m, new_e, p
    if kind == "memory":
        v = e + g
        s, m = compressor(v, step, workers)
        return s, m, v - s, v
    check_kind(kind)
    raise AssertionError  # unreachable


def feedback_step_sparse(
    kind: str,
    compressor: Compressor,
    g: torch.Tensor,
    e: torch.Tensor | None,
    lr: float,
    step: int = 0,
    workers: torch.Tensor | None = None,
):
    """The same step for fixed-count compressors (``compressor.fixed_count``), in O(n k) extra
    memory: the accumulated vector is formed once in a fresh tensor that becomes the new memory
    after its transmitted entries are replaced by (accumulated - sent).

    Returns (RowSparse sent, new memory or None, accumulated values at the support [n, k],
    accumulated dense tensor for ``none`` (else None)).
    ``sent + new memory == accumulated`` holds exactly, as in :func:`feedback_step`.
    """
    if kind == "none":
        a = g * lr
        rs = compressor.select(a, step, workers)
        return rs, None, a.gather(1, rs.indices), a
    if e is None:
        raise ValueError(f"error feedback {kind!r} needs a memory tensor")
    if kind in ("ef", "memory"):
        a = torch.add(e, g, alpha=lr) if kind == "ef" else e + g
        rs, acc_vals = finish_accumulated_(compressor, a, step, workers)
        return rs, a, acc_vals, None
    if kind == "ef-scaled":
        if lr <= 0:
            raise ValueError(f"ef-scaled needs a positive step size, got {lr!r}")
        p = torch.add(e, g, alpha=lr)
        rs = compressor.select(p / lr, step, workers)
        rs.values = rs.values * lr
        acc_vals = p.gather(1, rs.indices)
        p.scatter_(1, rs.indices, acc_vals - rs.values)
        return rs, p, acc_vals, None
    check_kind(kind)
    raise AssertionError  # unreachable


def accumulation_scale(kind: str, lr: float) -> float:
    """The factor c in the accumulated vector a = e + c * g of ``ef`` (c = lr) and ``memory`` (1)."""
    if kind == "ef":
        return lr
    if kind == "memory":
        return 1.0
    raise ValueError(f"only 'ef' and 'memory' accumulate e + c * g, got {kind!r}")


def finish_accumulated_(compressor: Compressor, a: torch.Tensor, step: int = 0, workers: torch.Tensor | None = None):
    """Second half of the ``ef``/``memory`` step for a fixed-count compressor, in place: ``a``
    [n, d] holds the accumulated vectors e + c g; it is compressed and then turned into the new
    memory a - C(a) by rewriting only the k transmitted entries per row.

    Returns (RowSparse sent, accumulated values at the support [n, k]). Engines that can form
    e + c g in the memory buffer directly (the grouped-gradient simulator) call this instead of
    :func:`feedback_step_sparse`.
    """
    rs = compressor.select(a, step, workers)
    acc_vals = a.gather(1, rs.indices)
    a.scatter_(1, rs.indices, acc_vals - rs.values)
    return rs, acc_vals
