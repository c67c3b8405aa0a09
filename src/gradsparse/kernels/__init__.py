"""Exact top-k by magnitude and the fused error-feedback pass: the one implementation of both.

Every exact selection in gradsparse goes through this package, and every function here follows
one tie rule.

Tie rule
--------
Entries are ranked by magnitude ``|x_i|``, largest first. **NaN ranks above +inf** (a NaN of
any sign or payload; all NaNs tie with each other). **Among equal magnitudes, and among NaNs,
the lower index wins.** ``+0.0`` and ``-0.0`` have equal magnitude, and so do ``+inf`` and
``-inf``. The top-``k`` set is therefore exactly the first ``k`` positions of a stable
descending sort of ``|x|`` with every NaN moved to the front (in index order). Nothing is raised
for NaNs and no extra pass is spent looking for them.

Public API
----------
``topk_indices(x, k) -> LongTensor[k]``
    exact top-``k`` of a tensor (flattened row-major), flat indices in ascending order.
``topk_indices_layerwise(flat, offsets, ks) -> LongTensor[sum(ks)]``
    exact top-``ks[l]`` of each segment ``flat[offsets[l]:offsets[l+1]]``, global indices in
    ascending order.
``topk_indices_rows(x, k) -> LongTensor[n, k]``
    exact top-``k`` of every row of a 2-D ``x``, column indices, ascending within each row.
``accumulate_topk_(e, g, alpha, k) -> (indices, values)``
    in place ``a = e + alpha * g`` (``e`` already holds ``a`` when ``g`` is None), select the
    exact top-``k`` of ``|a|``, return their ascending flat indices and ``a``'s values there,
    and set ``e`` there to ``+0.0`` (so ``e`` becomes ``a - C(a)``).
``accumulate_threshold_(e, g, alpha, threshold) -> (indices, values)``
    the same with the selection ``{i : |a_i| >= threshold}`` (``threshold`` rounded to ``e``'s
    dtype, as torch's comparison does). **A NaN never passes the test** (every comparison with
    NaN is false) and stays in ``e``.
``sampled_threshold(x, k, sample_fraction=0.01, generator=None) -> float``
    an approximate threshold for about ``k`` entries, from a uniform sample (for approximate
    top-k compressors).
``has_extension()``, ``extension_path()``
    whether (and from where) the compiled kernels are used.

All selection functions accept any floating dtype (float16, bfloat16, float32, float64) on any
device and return int64 indices on the input's device; ``k`` may be 0 or the full length, and
``k`` outside ``[0, d]`` raises :class:`ValueError`. They take a keyword ``use_ext`` (default
None: automatic; False: the pure-torch path; True: demand the compiled path, raising
:class:`RuntimeError` when it cannot be used). Both paths return identical results.

Modules
-------
- :mod:`.library`: finding and loading the compiled C library (``_kernels.c``), its ABI and
  rounding checks, ``has_extension``/``extension_path``, and the choice of path.
- :mod:`.workspace`: per-thread work buffers (the C workspace, the torch scratch tensors).
- :mod:`.tuning`: the pure-torch path's tunable constants (sample size, sampling cutoff, chunk
  length, rank scale), read from there at every call: the one place tests patch.
- :mod:`.keys`: integer keys that order entries like ``|x|`` (the tie rule as an integer order).
- :mod:`.checks`: argument checks shared by the entries.
- :mod:`.torch_path`: pure-torch selection of one vector (sample, chunked pass, exact selection).
- :mod:`.torch_segments`: pure-torch selection of many segments or rows at once.
- :mod:`.topk`: ``topk_indices``, ``topk_indices_layerwise``, ``topk_indices_rows``.
- :mod:`.error_feedback`: ``accumulate_topk_``, ``accumulate_threshold_``.
- :mod:`.approximate_threshold`: ``sampled_threshold``.
"""

from __future__ import annotations

from .approximate_threshold import sampled_threshold
from .error_feedback import accumulate_threshold_, accumulate_topk_
from .library import extension_path, has_extension
from .topk import topk_indices, topk_indices_layerwise, topk_indices_rows

__all__ = [
    "topk_indices",
    "topk_indices_layerwise",
    "topk_indices_rows",
    "accumulate_topk_",
    "accumulate_threshold_",
    "sampled_threshold",
    "has_extension",
    "extension_path",
]
