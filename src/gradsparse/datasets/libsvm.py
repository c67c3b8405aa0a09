"""Reading LIBSVM / svmlight text files, kept sparse.

Format: one sample per line, ``LABEL INDEX:VALUE INDEX:VALUE ...``, separated by spaces or tabs;
indices are 1-based and increasing within a line, features not listed are 0; ``#`` starts a
comment; blank lines are skipped. Files may be bz2- or gzip-compressed (detected from the first
bytes, whatever the name). rcv1's test file would need 7.6 GB densified (677,399 x 47,236
float32): :func:`read_libsvm` returns a ``scipy.sparse.csr_matrix`` instead.
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import DataMissingError


def _open_text(path: Path):
    with open(path, "rb") as fh:
        head = fh.read(3)
    if head[:3] == b"BZh":
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="ascii", errors="strict")
    if head[:2] == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="ascii", errors="strict")
    return open(path, "r", encoding="ascii", errors="strict")


def _locate_error(path: Path, n_features: int | None, lowest: int = 1) -> str | None:
    """Scan the file line by line; the first problem as ``"line N: ..."`` (None if none found);
    ``lowest``: the smallest feature index allowed (1, or 0 for a 0-based file)."""
    lineno = 0
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                body = line.split("#", 1)[0].split()
                if not body:
                    continue
                try:
                    float(body[0])
                except ValueError:
                    return f"line {lineno}: label {body[0]!r} is not a number"
                prev = lowest - 1
                for tok in body[1:]:
                    if tok.startswith("qid:"):
                        continue
                    idx, sep, val = tok.partition(":")
                    if not sep:
                        return f"line {lineno}: {tok!r} is not INDEX:VALUE"
                    try:
                        i = int(idx)
                        float(val)
                    except ValueError:
                        return f"line {lineno}: {tok!r} is not INDEX:VALUE with an integer index and a number"
                    if i < lowest:
                        return f"line {lineno}: feature index {i} < {lowest} (LIBSVM indices are 1-based)"
                    if i <= prev:
                        return f"line {lineno}: feature indices not increasing ({prev} then {i})"
                    if n_features is not None and i > n_features:
                        return f"line {lineno}: feature index {i} > n_features={n_features}"
                    prev = i
    except UnicodeDecodeError as exc:
        return f"line {lineno + 1}: not ASCII text ({exc.reason} at byte {exc.start} of the line)"
    except (OSError, EOFError) as exc:  # truncated / corrupt compressed stream
        return f"corrupt or truncated compressed data after {lineno} complete lines ({exc})"
    return None


def read_libsvm(path: str | os.PathLike, n_features: int | None = None,
                dtype=np.float32, zero_based: bool | str = False) -> tuple[sp.csr_matrix, np.ndarray]:
    """(X, y) from a LIBSVM file: X a ``scipy.sparse.csr_matrix`` of ``dtype`` (float32 unless told), shape
    [rows, n_features] (default: the largest index in the file), with exactly the listed
    nonzeros (explicit zeros are dropped); y float64 labels as written (e.g. -1/+1 or 0/1).

    Missing file: DataMissingError. A malformed line (non-numeric label or value, a token
    that is not INDEX:VALUE, an index < 1 or not increasing, an index above ``n_features``) or a
    truncated compressed file: ValueError naming the file and the line. ``zero_based``: False for
    LIBSVM's 1-based indices; ``"auto"`` also takes 0-based files (what scikit-learn's
    ``dump_svmlight_file`` writes by default), shifting a file whose smallest index is 0."""
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(None, [path.name], [path.parent.absolute()],
                               hint=" (a LIBSVM file; gisette / madelon / rcv1: gradsparse data download NAME)")
    if n_features is not None and (isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer))
                                   or n_features < 1):
        raise ValueError(f"n_features must be a positive integer or None, got {n_features!r}")
    from sklearn.datasets import load_svmlight_file

    try:
        with _open_text(path) as fh:  # sklearn decompresses by file name only: hand it the stream
            X, y = load_svmlight_file(fh.buffer if hasattr(fh, "buffer") else fh, n_features=n_features,
                                      dtype=dtype, zero_based=zero_based)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        where = _locate_error(path, n_features, lowest=1 if zero_based is False else 0)
        raise ValueError(f"{path}: not a valid LIBSVM file: {where or exc}") from exc
    X = sp.csr_matrix(X, dtype=dtype)
    X.eliminate_zeros()
    X.sort_indices()
    return X, np.asarray(y, dtype=np.float64)
