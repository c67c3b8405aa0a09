"""Reading MNIST / Fashion-MNIST IDX files (gzip-compressed or raw) from a local directory.

IDX format: 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), the number of dimensions, then one big-endian uint32 per dimension,
then the data in C order, big-endian.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ..datasets.errors import DataMissingError

IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Sub-directories searched (in order) under data_dir, then data_dir itself.
DATASET_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST"),
}


def default_data_dir() -> Path:
    """``$GRADSPARSE_DATA`` if set, else ``~/.cache/gradsparse``."""
    env = os.environ.get("GRADSPARSE_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/gradsparse").expanduser()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip detected from its magic bytes, whatever the file name)."""
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}; known: {[hex(c) for c in IDX_TYPES]}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX size mismatch: header says shape {shape} ({count * dtype.itemsize} bytes), "
            f"file has {len(raw) - header} data bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def find_idx_files(dataset: str, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Locate the four IDX files of ``dataset`` ("mnist" or "fashion_mnist").

    Looks in ``data_dir/<sub>`` for each sub-directory of DATASET_SUBDIRS[dataset], then in
    ``data_dir`` itself; each file may be raw or carry a ``.gz`` suffix. All four files must be in
    the same directory. Raises DataMissingError (a FileNotFoundError) naming the files, the
    directories searched and the command ``gradsparse data download DATASET``."""
    if dataset not in DATASET_SUBDIRS:
        raise ValueError(f"unknown IDX dataset {dataset!r}; allowed: {list(DATASET_SUBDIRS)}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    candidates = [root / sub for sub in DATASET_SUBDIRS[dataset]] + [root]
    for folder in candidates:
        found = {}
        for key, base in IDX_FILES.items():
            for fname in (base, base + ".gz"):
                if (folder / fname).is_file():
                    found[key] = folder / fname
                    break
        if len(found) == len(IDX_FILES):
            return found
    raise DataMissingError(dataset, [f"{f}[.gz]" for f in IDX_FILES.values()], candidates,
                           hint=" (all four files together in one directory)")


def load_idx_dataset(
    dataset: str, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images [n,H,W] uint8, train_labels [n], test_images, test_labels)."""
    files = find_idx_files(dataset, data_dir)
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        imgs, labs = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if imgs.ndim != 3 or labs.ndim != 1 or imgs.shape[0] != labs.shape[0]:
            raise ValueError(
                f"{dataset} {split}: images shape {imgs.shape} and labels shape {labs.shape} do not "
                f"match ([n, H, W] and [n] expected)"
            )
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]
