"""The fused error-feedback passes: accumulate, select (exact top-k or a hard threshold), zero.

``a = e + alpha * g`` is computed exactly as ``e.add_(g, alpha=alpha)`` does on this torch (a
fused multiply-add, single rounding, with ``alpha`` rounded to the tensor's dtype). The compiled
path checks this agreement when it loads (:mod:`.library`) and otherwise leaves the updates with
``g`` to torch; the torch path fuses the update into its chunked pass only where adding chunk by
chunk rounds like one whole ``add_`` (:func:`.torch_path.add_in_chunks`). Work buffers: the
per-thread caches of :mod:`.workspace`.
"""

from __future__ import annotations

import torch

from .checks import check_float, check_k
from .library import Library, suits_compiled, thread_count, use_compiled
from .torch_path import add_in_chunks, chunk_length, expand_words, mask_words, topk_torch
from .workspace import c_workspace, thread_scratch


def _check_ef(e: torch.Tensor, g: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """Validate ``e`` (contiguous floating, updated in place) and ``g`` (None, or as many entries
    of the same dtype and device); returns ``g`` flat and contiguous."""
    check_float(e, "e")
    if not e.is_contiguous():
        raise ValueError(f"{what}: e must be contiguous (it is updated in place)")
    if g is None:
        return None
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{what}: g must be a torch.Tensor or None, got {type(g).__name__}")
    if g.numel() != e.numel():
        raise ValueError(f"{what}: e and g must have the same number of entries (same shape), got {tuple(e.shape)} and {tuple(g.shape)}")
    if g.dtype != e.dtype or g.device != e.device:
        raise ValueError(f"{what}: e and g must share dtype and device, got {e.dtype}/{e.device} and {g.dtype}/{g.device}")
    return g.reshape(-1).contiguous()


def _use_c_ef(e: torch.Tensor, g: torch.Tensor | None, use_ext: bool | None, what: str) -> bool:
    use = use_compiled(use_ext, suits_compiled(e), what)
    if use and g is not None and not Library.ef_exact:
        if use_ext is True:
            raise RuntimeError(f"{what}: the compiled update does not round like torch's add_ here")
        return False
    return use


def accumulate_topk_(
    e: torch.Tensor, g: torch.Tensor | None, alpha: float, k: int, *, use_ext: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One error-feedback step with exact top-k, in place in ``e``::

        a = e + alpha * g          (as e.add_(g, alpha=alpha); skipped when g is None)
        S = exact top-k of |a|     (the package's tie rule: NaN first, lower index wins)
        e = a with e[S] = +0.0     -> returns (S ascending int64 [k], a[S] [k], e's dtype)

    ``e`` is any contiguous floating tensor (indices are flat), ``g`` None or a tensor with as
    many entries and the same dtype and device. Bit for bit the same as ``e.add_(g,
    alpha=alpha)`` followed by :func:`topk_indices` and the gather and zeroing, on either path.
    The compiled path (float32 CPU) makes one fused pass that reads ``g`` and ``e`` and writes
    ``e``; the torch path fuses the update into its chunked pass when that rounds like one
    ``add_``. Work buffers: the per-thread caches of :mod:`.workspace`.
    """
    g = _check_ef(e, g, "accumulate_topk_")
    n = e.numel()
    k = check_k(k, n)
    alpha = float(alpha)
    flat = e.view(-1)
    if _use_c_ef(e, g, use_ext, "accumulate_topk_"):
        idx = torch.empty(k, dtype=torch.long)
        val = torch.empty(k, dtype=torch.float32)
        gp = None if g is None else g.data_ptr()
        rc = Library.lib.gs_topk_ef(c_workspace(), flat.data_ptr(), gp, alpha, n, k, idx.data_ptr(), val.data_ptr(), thread_count())
        if rc != 0:
            raise MemoryError("accumulate_topk_: the compiled kernel ran out of memory")
        return idx, val
    add = None
    if g is not None:
        if add_in_chunks(e):
            add = (g, alpha)
        else:
            flat.add_(g, alpha=alpha)
    idx, val = topk_torch(flat, k, None, add)
    if val is None:
        val = flat.index_select(0, idx)
    flat.index_fill_(0, idx, 0)
    return idx, val


def accumulate_threshold_(
    e: torch.Tensor, g: torch.Tensor | None, alpha: float, threshold: float, *, use_ext: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One error-feedback step with a hard threshold, in place in ``e``::

        a = e + alpha * g               (as e.add_(g, alpha=alpha); skipped when g is None)
        S = {i : |a_i| >= threshold}    (threshold rounded to e's dtype, like torch's comparison)
        e = a with e[S] = +0.0          -> returns (S ascending int64, a[S] in e's dtype)

    **NaN is never selected**: ``|NaN| >= threshold`` is false, so a NaN stays in ``e`` (and a
    NaN threshold selects nothing); ``threshold <= 0`` selects every other entry. Same inputs,
    bit-identity guarantee and buffers as :func:`accumulate_topk_`.
    """
    g = _check_ef(e, g, "accumulate_threshold_")
    lam, alpha = float(threshold), float(alpha)
    n = e.numel()
    flat = e.view(-1)
    if _use_c_ef(e, g, use_ext, "accumulate_threshold_"):
        lib = Library.lib
        ws = c_workspace()
        gp = None if g is None else g.data_ptr()
        cnt = lib.gs_ht_pass(ws, flat.data_ptr(), gp, alpha, lam, n, thread_count())
        if cnt < 0:
            raise MemoryError("accumulate_threshold_: the compiled kernel ran out of memory")
        idx = torch.empty(cnt, dtype=torch.long)
        val = torch.empty(cnt, dtype=torch.float32)
        lib.gs_ht_gather(ws, idx.data_ptr(), val.data_ptr())
        return idx, val
    # chunk by chunk: a = e + alpha*g, |a| to a small scratch, the mask |a| >= lam scanned as
    # 8-byte words (see mask_words)
    dev = e.device
    fused = g is not None and add_in_chunks(e)
    if g is not None and not fused:
        flat.add_(g, alpha=alpha)
    C = chunk_length(n, dev)
    ab = thread_scratch("abs", C, e.dtype, dev)
    mb = thread_scratch("mask", C, torch.uint8, dev)
    acc: tuple[list, list] = ([], [])
    for s in range(0, n, C):
        t = min(n, s + C)
        a = flat[s:t].add_(g[s:t], alpha=alpha) if fused else flat[s:t]
        mask_words(torch.abs(a, out=ab[: t - s]), lam, mb, s, acc)
    idx = expand_words(acc, dev)
    val = flat.index_select(0, idx)
    flat.index_fill_(0, idx, 0)
    return idx, val
