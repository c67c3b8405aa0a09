"""Exact top-k by magnitude: of a whole tensor, of each segment, of every row.

Each entry takes the compiled path for contiguous float32 CPU input (unless ``use_ext=False``
or the library is missing or disabled; :mod:`.library`) and the pure-torch path otherwise
(:mod:`.torch_path`, :mod:`.torch_segments`); both return the same indices, chosen by the
package's tie rule.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .checks import check_float, check_k
from .library import Library, suits_compiled, thread_count, use_compiled
from .torch_path import topk_torch
from .torch_segments import layerwise_torch
from .workspace import c_workspace


def topk_indices(x: torch.Tensor, k: int, *, use_ext: bool | None = None) -> torch.Tensor:
    """Exact top-``k`` entries of ``x`` by magnitude, as flat indices sorted ascending.

    ``x`` is any floating tensor (flattened row-major). Tie rule of the package: NaN above +inf,
    the lower index wins among equal magnitudes. ``k = 0`` gives an empty tensor, ``k = d`` every
    index; ``k > d`` or ``k < 0`` raise :class:`ValueError`.

    Returns an int64 tensor of length ``k`` on ``x``'s device.
    """
    check_float(x, "x")
    flat = x.reshape(-1)
    n = flat.numel()
    k = check_k(k, n)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if k == n:
        return torch.arange(n, device=x.device)
    if use_compiled(use_ext, suits_compiled(flat), "topk_indices"):
        out = torch.empty(k, dtype=torch.long)
        rc = Library.lib.gs_topk(c_workspace(), flat.data_ptr(), n, k, out.data_ptr(), thread_count())
        if rc != 0:
            raise MemoryError("topk_indices: the compiled kernel ran out of memory")
        return out
    return topk_torch(flat.contiguous(), k)[0]


def _as_long_list(v, name: str) -> torch.Tensor:
    t = torch.as_tensor(v)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(device="cpu", dtype=torch.long).contiguous()


def topk_indices_layerwise(
    x_flat: torch.Tensor,
    offsets: Sequence[int] | torch.Tensor,
    ks: Sequence[int] | torch.Tensor,
    *,
    use_ext: bool | None = None,
) -> torch.Tensor:
    """Exact top-``ks[l]`` of each segment ``x_flat[offsets[l]:offsets[l+1]]``.

    ``offsets`` has ``L + 1`` non-decreasing entries within ``[0, x_flat.numel()]`` (entries
    outside every segment are never selected); ``ks`` has ``L`` entries with
    ``0 <= ks[l] <= offsets[l+1] - offsets[l]``. Returns global flat indices of ``x_flat``, sorted
    ascending (length ``sum(ks)``). Same tie rule and NaN policy as :func:`topk_indices`, applied
    within each segment. ``x_flat`` may have any floating dtype. Small segments are handled in
    bulk (in C: spread over threads; in torch: one padded ``torch.topk`` per power-of-two size
    class), never one Python call per segment.
    """
    check_float(x_flat, "x_flat")
    flat = x_flat.reshape(-1)
    D = flat.numel()
    off = _as_long_list(offsets, "offsets")
    kt = _as_long_list(ks, "ks")
    if off.numel() < 1:
        raise ValueError("offsets must have at least one entry (L + 1 boundaries)")
    L = off.numel() - 1
    if kt.numel() != L:
        raise ValueError(f"ks has {kt.numel()} entries but offsets describes {L} segments")
    if int(off[0]) < 0 or int(off[-1]) > D:
        raise ValueError(f"offsets must lie within [0, {D}], got first {int(off[0])} and last {int(off[-1])}")
    sizes = off[1:] - off[:-1]
    # one check on the common path (a negative size makes kt > sizes for every kt >= 0)
    if L and bool(((kt < 0) | (kt > sizes)).any()):
        if bool((sizes < 0).any()):
            raise ValueError("offsets must be non-decreasing")
        bad = int(((kt < 0) | (kt > sizes)).nonzero()[0])
        raise ValueError(
            f"segment {bad}: k={int(kt[bad])} must lie within [0, d_l={int(sizes[bad])}] (the segment size)"
        )
    total = int(kt.sum()) if L else 0
    if total == 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if use_compiled(use_ext, suits_compiled(flat), "topk_indices_layerwise"):
        lib = Library.lib
        out = torch.empty(total, dtype=torch.long)
        # opos = None: the kernel takes the output positions from the prefix sums of ks
        rc = lib.gs_topk_segments(c_workspace(), flat.data_ptr(), off.data_ptr(), kt.data_ptr(), None, L, out.data_ptr(), thread_count())
        if rc != 0:
            raise MemoryError("topk_indices_layerwise: the compiled kernel ran out of memory")
        return out
    return layerwise_torch(flat, off, kt, sizes)


def topk_indices_rows(x: torch.Tensor, k: int, *, use_ext: bool | None = None) -> torch.Tensor:
    """Exact top-``k`` of every row of a 2-D ``x`` ``[n, d]``: column indices ``[n, k]`` (int64),
    ascending within each row.

    Tie rule of the package within each row (NaN above +inf, lower column first). ``x`` is any
    floating dtype on any device (the compiled path takes contiguous float32 CPU input; a
    non-contiguous ``x`` is copied once). ``k`` may be 0 (``[n, 0]``) or ``d`` (every column);
    ``k`` outside ``[0, d]`` raises :class:`ValueError`. The rows are selected together (one
    layer-wise call over the row segments), never one Python call per row.
    """
    check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [n, d], got shape {tuple(x.shape)}")
    n, d = x.shape
    k = check_k(k, d, " (row length)")
    if k == 0 or n == 0:
        return torch.empty(n, k, dtype=torch.long, device=x.device)
    if k == d:
        return torch.arange(d, device=x.device).expand(n, d).contiguous()
    xc = x.contiguous().view(-1)
    offs = torch.arange(0, n * d + 1, d, dtype=torch.long)
    ks = torch.full((n,), k, dtype=torch.long)
    if use_compiled(use_ext, suits_compiled(xc), "topk_indices_rows"):
        flat = torch.empty(n * k, dtype=torch.long)
        rc = Library.lib.gs_topk_segments(c_workspace(), xc.data_ptr(), offs.data_ptr(), ks.data_ptr(), None, n, flat.data_ptr(), thread_count())
        if rc != 0:
            raise MemoryError("topk_indices_rows: the compiled kernel ran out of memory")
    else:
        flat = layerwise_torch(xc, offs, ks, torch.full((n,), d, dtype=torch.long))
    out = flat.view(n, k)
    return out.sub_(offs[:-1].to(out.device).unsqueeze(1))
