"""``gradsparse.ddp``: the DDP communication hook, under its usual name. It lives in
:mod:`gradsparse.distributed.ddp_hook` (with the rest of what runs across processes); this module
names the same objects, so ``gradsparse.ddp.hook`` and ``gradsparse.ddp.SparsifiedState`` keep
working."""

from .distributed.ddp_hook import (  # noqa: F401 (the public names, re-exported)
    NonFiniteGradient,
    SparsifiedState,
    aggregate_bucket,
    compress_bucket,
    decode_bucket,
    hook,
    layout_of,
    segment_compressor,
)

__all__ = ["SparsifiedState", "hook", "layout_of", "segment_compressor", "NonFiniteGradient", "compress_bucket",
           "decode_bucket", "aggregate_bucket"]
