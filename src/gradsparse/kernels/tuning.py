"""The pure-torch path's tunable constants, read from this module at every call.

They set only how fast a selection runs, never its result (the selection is exact whatever the
sample, chunk or first threshold). Code reads them as ``tuning.NAME`` when it runs, so a test
that assigns ``tuning.CHUNK_LENGTH = ...`` (or calls :func:`set_rank_scale`) changes what the
next call does; nothing else holds a copy. The compiled library keeps its own constants in
``_kernels.c``; :func:`set_rank_scale` sets the rank scale on both paths.
"""

from __future__ import annotations

from . import library

SAMPLING_SEED = 0x5EED  # fixed sampling seed: results never depend on it, only the running time does
SAMPLING_CUTOFF = 65536  # below this many entries, select directly without sampling
SAMPLE_SIZE = 32768  # sampled positions (one per stratum) that set the first candidate threshold
CHUNK_LENGTH = 1 << 20  # on CPU: elements per pass chunk (the scratch stays in cache)
RANK_SCALE = 1.0  # testing hook, see set_rank_scale


def set_rank_scale(v: float) -> None:
    """Testing hook: scale the sample rank that sets the first candidate threshold on both
    paths (0 makes the first threshold the sample maximum, which exercises the retry loop)."""
    global RANK_SCALE
    RANK_SCALE = float(v)
    library.load()
    if library.Library.lib is not None:
        library.Library.lib.gs_set_rank_scale(float(v))
