"""Reading CIFAR-10's "python version" (``cifar-10-python.tar.gz``).

The tarball holds ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` (10,000
training images each), ``test_batch`` (10,000) and ``batches.meta``. Each batch is a python
pickle (written by python 2) of a dict with byte-string keys: ``b"data"``, a uint8 array
[10000, 3072] (each row the 1024 red, then 1024 green, then 1024 blue values of a 32x32 image,
row-major), ``b"labels"``, a list of 10000 ints 0..9, plus ``b"batch_label"`` and
``b"filenames"``.

The pickles are read with a restricted unpickler that only allows the numpy names an array
needs (no other code can run from a tampered file). They are read from the extracted folder,
or straight from the tarball when it has not been extracted.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from .errors import DataMissingError
from .registry import CIFAR10_BATCHES, get

TRAIN_BATCHES = CIFAR10_BATCHES[:5]
TEST_BATCH = CIFAR10_BATCHES[5]
TARBALL = "cifar-10-python.tar.gz"
ROW = 3 * 32 * 32

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 3, 32, 32], labels int64 [n]) from one pickled batch; ValueError naming
    ``where`` when the bytes are not a CIFAR-10 batch."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise ValueError(f"{where}: not a CIFAR-10 python batch (unpickling failed after {len(raw)} bytes "
                         f"read: {type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a CIFAR-10 batch is a dict, got {type(obj).__name__}")
    keys = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in keys or "labels" not in keys:
        raise ValueError(f"{where}: a CIFAR-10 batch has keys b'data' and b'labels', found "
                         f"{sorted(obj, key=repr)!r}")
    data = np.asarray(keys["data"])
    labels = np.asarray(keys["labels"])
    if data.ndim != 2 or data.shape[1] != ROW:
        raise ValueError(f"{where}: b'data' must have shape [n, {ROW}], got {data.shape}")
    if data.dtype != np.uint8:
        if data.size and (not np.issubdtype(data.dtype, np.integer) or data.min() < 0 or data.max() > 255):
            raise ValueError(f"{where}: b'data' must hold uint8 pixel values, got dtype {data.dtype}")
        data = data.astype(np.uint8)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{where}: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels for "
                         f"{data.shape[0]} images")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{where}: labels must be integers 0..9")
    return data.reshape(-1, 3, 32, 32).copy(), labels.astype(np.int64)


def _read_tar(tar_path: Path) -> dict[str, bytes]:
    out = {}
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            for member in CIFAR10_BATCHES:
                try:
                    fh = tf.extractfile(member)
                except KeyError:
                    fh = None
                if fh is None:
                    raise ValueError(f"{tar_path}: member {member} missing from the tarball")
                out[member] = fh.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{tar_path}: not a readable CIFAR-10 tarball ({type(exc).__name__}: {exc})") from exc
    return out


def read_cifar10(data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x uint8 [50000, 3, 32, 32], train_y int64 [50000], test_x uint8 [10000, 3, 32, 32],
    test_y int64 [10000]) (fewer rows for smaller batch files), channels R, G, B.

    Looks in ``DATA_DIR/cifar10``, ``DATA_DIR/cifar-10`` and ``DATA_DIR`` (``data_dir`` default
    ``$GRADSPARSE_DATA`` or ``~/.cache/gradsparse``) for the extracted ``cifar-10-batches-py/``,
    then for the tarball. DataMissingError when neither is there; ValueError naming the file
    when a batch is corrupt."""
    ds = get("cifar10")
    dirs = ds.dirs(data_dir)
    raws: dict[str, bytes] | None = None
    for folder in dirs:
        if all((folder / b).is_file() for b in CIFAR10_BATCHES):
            raws = {b: (folder / b).read_bytes() for b in CIFAR10_BATCHES}
            where = {b: str(folder / b) for b in CIFAR10_BATCHES}
            break
        if (folder / TARBALL).is_file():
            raws = _read_tar(folder / TARBALL)
            where = {b: f"{folder / TARBALL}:{b}" for b in CIFAR10_BATCHES}
            break
    if raws is None:
        raise DataMissingError("cifar10", [TARBALL, "cifar-10-batches-py/{data_batch_1..5,test_batch}"], dirs)
    parts = [_parse_batch(raws[b], where[b]) for b in TRAIN_BATCHES]
    test_x, test_y = _parse_batch(raws[TEST_BATCH], where[TEST_BATCH])
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return train_x, train_y, test_x, test_y
