"""Finding and loading the optional compiled kernels, and choosing between the two paths.

A small C library (``gradsparse/_kernels.c``, built as the optional extension
``gradsparse._kernels_c`` by ``pip install -e .`` when a C compiler is present) implements the
contiguous float32 CPU case with one fused pass over the data (see the file's header for the
algorithm: sample a threshold with a fixed-seed generator, filter candidates in one pass, select
exactly among them). It is loaded with :mod:`ctypes` on first use, found as the module
``gradsparse._kernels_c`` or, failing that, as a ``_kernels_c*.so``/``.pyd`` file in the
``gradsparse`` package folder, and refused unless its ``gs_abi_version()`` is
:data:`ABI_VERSION`. Everything else -- other dtypes and devices, a missing library,
``GRADSPARSE_NO_EXT=1`` in the environment, ``use_ext=False`` -- takes the pure-torch path
(:mod:`.torch_path`). Both paths return identical results.

The error-feedback update ``a = e + alpha * g`` must round exactly as ``e.add_(g, alpha=alpha)``
does on this torch (a fused multiply-add, single rounding, with ``alpha`` rounded to the
tensor's dtype): when the library loads, :func:`_probe_fma` picks the C update mode (fused or
not) that agrees with torch, and records in ``Library.ef_exact`` whether one does; otherwise
the updates with ``g`` are left to torch.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import math
import os

import torch

ABI_VERSION = 3  # gs_abi_version() of the C library this module drives

# the folder of the gradsparse package, where an in-place build puts _kernels_c*.so
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Library:
    """The loaded library (``lib``, from ``path``), or why it is not there (``error``)."""

    lib: ctypes.CDLL | None = None
    path: str | None = None
    error: str | None = None
    ef_exact: bool = False
    loaded: bool = False


def _find_library() -> str | None:
    """Path of the built extension: the importable module, else a file in the package folder."""
    try:
        spec = importlib.util.find_spec("gradsparse._kernels_c")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.exists(spec.origin):
        return spec.origin
    pattern = os.path.join(_PACKAGE_DIR, "_kernels_c*")
    cands = sorted(glob.glob(pattern + ".so") + glob.glob(pattern + ".pyd"))
    return cands[0] if cands else None


def load() -> None:
    """Load the library once per process (later calls return at once); see :class:`Library`."""
    if Library.loaded:
        return
    Library.loaded = True
    path = _find_library()
    if path is None:
        Library.error = "extension gradsparse._kernels_c is not built"
        return
    try:
        lib = ctypes.CDLL(path)
        if lib.gs_abi_version() != ABI_VERSION:  # 3: gs_topk_ef / gs_ht_pass accept g = NULL
            raise OSError(f"ABI version {lib.gs_abi_version()}, expected {ABI_VERSION} (rebuild: pip install -e .)")
    except (OSError, AttributeError) as exc:  # pragma: no cover - depends on the build
        Library.error = f"cannot load {path}: {exc}"
        return
    vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.gs_ws_new.restype = vp
    lib.gs_ws_new.argtypes = []
    lib.gs_ws_free.argtypes = [vp]
    lib.gs_ws_free.restype = None
    lib.gs_ws_stats.argtypes = [vp, vp]
    lib.gs_ws_stats.restype = None
    lib.gs_force_generic.argtypes = [i32]
    lib.gs_force_generic.restype = None
    lib.gs_set_rank_scale.argtypes = [ctypes.c_double]
    lib.gs_set_rank_scale.restype = None
    lib.gs_set_fma.argtypes = [i32]
    lib.gs_set_fma.restype = None
    lib.gs_get_fma.argtypes = []
    lib.gs_get_fma.restype = i32
    lib.gs_topk.argtypes = [vp, vp, i64, i64, vp, i32]
    lib.gs_topk.restype = i32
    lib.gs_topk_ef.argtypes = [vp, vp, vp, f32, i64, i64, vp, vp, i32]
    lib.gs_topk_ef.restype = i32
    lib.gs_ht_pass.argtypes = [vp, vp, vp, f32, f32, i64, i32]
    lib.gs_ht_pass.restype = i64
    lib.gs_ht_gather.argtypes = [vp, vp, vp]
    lib.gs_ht_gather.restype = None
    lib.gs_topk_segments.argtypes = [vp, vp, vp, vp, vp, i64, vp, i32]
    lib.gs_topk_segments.restype = i32
    Library.lib = lib
    Library.path = path
    Library.ef_exact = _probe_fma(lib)


def _probe_fma(lib: ctypes.CDLL) -> bool:
    """Make the C update a = e + alpha*g round exactly like torch's ``e.add_(g, alpha=alpha)``."""
    gen = torch.Generator().manual_seed(1234)
    n = 4099  # odd length: exercises torch's vector body and scalar tail
    e0 = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    ws = lib.gs_ws_new()
    try:
        for alpha in (0.37, -1.7e-3):
            ref = e0.clone().add_(g, alpha=alpha)
            ok = False
            for fma in (1, 0):
                lib.gs_set_fma(fma)
                e = e0.clone()
                lib.gs_ht_pass(ws, e.data_ptr(), g.data_ptr(), alpha, math.inf, n, 1)
                if torch.equal(e, ref):
                    ok = True
                    break
            if not ok:
                lib.gs_set_fma(1)
                return False
        return True
    finally:
        lib.gs_ws_free(ws)


def force_generic(on: bool) -> None:
    """Testing hook: make the compiled path use its baseline-ISA loops instead of AVX2+FMA."""
    load()
    if Library.lib is not None:
        Library.lib.gs_force_generic(1 if on else 0)


def disabled_by_environment() -> bool:
    """True when GRADSPARSE_NO_EXT is set to anything but empty or 0."""
    return os.environ.get("GRADSPARSE_NO_EXT", "") not in ("", "0")


def has_extension() -> bool:
    """True when the compiled kernels are built, loadable and not disabled by GRADSPARSE_NO_EXT."""
    if disabled_by_environment():
        return False
    load()
    return Library.lib is not None


def extension_path() -> str | None:
    """File the compiled kernels were loaded from (None when they are not available)."""
    load()
    return Library.path


def use_compiled(use_ext: bool | None, ok: bool, what: str) -> bool:
    """Decide the path: ``ok`` says whether the inputs suit the compiled kernel."""
    if use_ext is False:
        return False
    avail = has_extension()
    if use_ext is True:
        if not avail:
            why = "disabled by GRADSPARSE_NO_EXT" if disabled_by_environment() else Library.error
            raise RuntimeError(f"{what}: compiled kernels requested (use_ext=True) but unavailable: {why}")
        if not ok:
            raise RuntimeError(f"{what}: compiled kernels need contiguous float32 CPU tensors")
        return True
    return avail and ok


def thread_count() -> int:
    """Threads the compiled kernels may use: torch's setting, within [1, 64]."""
    return max(1, min(64, torch.get_num_threads()))


def suits_compiled(*ts: torch.Tensor) -> bool:
    """True when every tensor is contiguous float32 on the CPU (what the compiled kernels take)."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts)


