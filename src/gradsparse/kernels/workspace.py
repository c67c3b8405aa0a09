"""Per-thread work buffers: the C workspace and the torch scratch tensors.

The work buffers live in **per-thread caches** (:class:`threading.local`): each thread gets its
own C workspace (candidate lists that grow only when a call needs more room than any earlier
one, freed when the thread ends) and its own torch scratch tensors (grow-only, keyed by name,
dtype and device; on CPU one chunk long, elsewhere as long as the largest input seen). So after
the first call of a given size a call allocates only its O(k) outputs (and O(k) temporaries),
and threads never share buffers. The tensors the selection functions return are freshly
allocated and owned by the caller.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from .library import Library


class _CWorkspace:
    """Owns one C workspace (freed with the object, i.e. when its thread's cache goes away)."""

    def __init__(self) -> None:
        self.ptr = Library.lib.gs_ws_new()
        if not self.ptr:
            raise MemoryError("cannot allocate the C workspace")
        self._free = Library.lib.gs_ws_free

    def __del__(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self._free(ptr)


class _Cache(threading.local):
    """This thread's buffers: its C workspace (made on first use) and its torch scratch by key."""

    def __init__(self) -> None:
        self.ws: _CWorkspace | None = None
        self.bufs: dict[tuple, torch.Tensor] = {}


_CACHE = _Cache()


def c_workspace() -> int:
    """This thread's C workspace (created on first use)."""
    c = _CACHE
    if c.ws is None:
        c.ws = _CWorkspace()
    return c.ws.ptr


def thread_scratch(name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A work tensor of at least ``n`` entries from this thread's cache (grow-only), sliced to n."""
    key = (name, dtype, torch.device(device))
    bufs = _CACHE.bufs
    b = bufs.get(key)
    if b is None or b.numel() < n:
        b = torch.empty(n, dtype=dtype, device=device)
        bufs[key] = b
    return b[:n]


def workspace_info() -> dict:
    """Testing hook: this thread's buffer counters, to check that warm calls allocate nothing
    of size O(d). ``c_allocs``/``c_bytes``: (re)allocations so far and bytes held by the C
    workspace; ``buffers``: ``{(name, dtype, device): (data_ptr, numel)}`` of the torch scratch."""
    info: dict = {"c_allocs": 0, "c_bytes": 0}
    if _CACHE.ws is not None:
        st = (ctypes.c_int64 * 2)()
        Library.lib.gs_ws_stats(_CACHE.ws.ptr, ctypes.addressof(st))
        info["c_allocs"], info["c_bytes"] = int(st[0]), int(st[1])
    info["buffers"] = {k: (b.data_ptr(), b.numel()) for k, b in _CACHE.bufs.items()}
    return info
