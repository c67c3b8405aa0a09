"""Wire format: :class:`~gradsparse.messages.SparseBatch` <-> bytes, with exact byte counts.

A batch of n rows goes on the wire as n self-delimiting frames, one per row
(:func:`encode` / :func:`decode`); :func:`encoded_nbytes` gives every row's frame size without
building bytes (``sum(encoded_nbytes(b)) == len(encode(b))``), and every byte count gradsparse
reports as "sent" is that size, so compression ratios, plots and the real ``torch.distributed``
engine share one accounting. Under ``index_encoding="auto"`` each row gets its smallest frame,
the dense frame included, so no row is charged more than :func:`dense_nbytes`.

Modules:

* :mod:`~gradsparse.wire.format` - frame layout, encoding and dtype ids, version history, header
  read/write, CRC, :class:`WireError`, frame-size formula;
* :mod:`~gradsparse.wire.codecs` - the index payload codecs and their parameter choices;
* :mod:`~gradsparse.wire.sizing` - exact sizes without bytes (per batch, vectorised);
* :mod:`~gradsparse.wire.frames` - :func:`encode`, :func:`decode`, :func:`frame_headers`.
"""

from .codecs import packed_width, rice_parameter
from .format import (
    DEFAULT_MAX_D,
    INDEX_ENCODINGS,
    VALUE_DTYPES,
    VERSION,
    FrameHeader,
    WireError,
    round_values,
    value_dtype_of,
)
from .frames import decode, decode_each, encode, frame_headers, sendable
from .sizing import (
    dense_nbytes,
    encoded_nbytes,
    index_entropy_bits,
    index_payload_nbytes,
)

__all__ = [
    "encode",
    "decode",
    "decode_each",
    "encoded_nbytes",
    "dense_nbytes",
    "index_entropy_bits",
    "index_payload_nbytes",
    "rice_parameter",
    "packed_width",
    "frame_headers",
    "FrameHeader",
    "WireError",
    "VERSION",
    "DEFAULT_MAX_D",
    "INDEX_ENCODINGS",
    "VALUE_DTYPES",
    "round_values",
    "sendable",
    "value_dtype_of",
]
