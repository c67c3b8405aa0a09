"""The downloadable data sets: where each file comes from, its checksum, where it lies on disk.

Layout under the data directory (``data_dir``, default ``$GRADSPARSE_DATA`` or
``~/.cache/gradsparse``): each data set has its own folder, ``DATA_DIR/<name>/`` (``mnist``,
``fashion_mnist``, ``cifar10``, ``gisette``, ``madelon``, ``rcv1``), where ``gradsparse data
download NAME`` puts its files. Readers also look in a few other usual places (for MNIST the
torchvision layout ``MNIST/raw``; for every set ``DATA_DIR`` itself), see ``DataSet.dirs``.

Files and formats:
  * mnist, fashion_mnist: the four IDX files, gzip-compressed (``train-images-idx3-ubyte.gz``
    etc.; the uncompressed names are accepted too). Read by :mod:`gradsparse.tasks.idx`.
  * cifar10: ``cifar-10-python.tar.gz``, extracted to ``cifar-10-batches-py/`` (``data_batch_1``
    .. ``data_batch_5``, ``test_batch``: python pickles). Read by :func:`read_cifar10`.
  * gisette, madelon, rcv1: LIBSVM text files from the LIBSVM binary-classification page (bz2 or
    plain; a decompressed copy under the name without ``.bz2`` is accepted). Read (sparse) by
    :func:`read_libsvm`.

Checksums are ``"md5:<hex>"`` or ``"sha256:<hex>"``, the published values (torchvision's for
MNIST / Fashion-MNIST, the CIFAR page's for CIFAR-10). The LIBSVM page publishes none: those are
``None`` ("checksum unknown: recorded on first download"): :func:`download` then writes the
file's sha256 next to it (``FILE.sha256``) and checks later copies against that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataMissingError

LIBSVM_BINARY = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/"
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                   "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR10_BATCHES = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)) + ("cifar-10-batches-py/test_batch",)


@dataclass(frozen=True)
class FileEntry:
    """One downloadable file: its name on disk, the URLs it is fetched from (mirrors, in order),
    its checksum (``"md5:..."``, ``"sha256:..."`` or None when unknown) and ``alternatives``:
    other sets of relative paths that stand for it when all of them are present (the
    decompressed copy of a ``.bz2``, the extracted batches of a tarball)."""

    name: str
    urls: tuple[str, ...]
    checksum: str | None
    alternatives: tuple[tuple[str, ...], ...] = ()
    extract: bool = False  # a tarball to unpack after download (safely)


@dataclass(frozen=True)
class DataSet:
    """A registry entry: ``files`` (all needed), ``subdirs`` searched under the data directory
    (the first is where downloads go; ``""`` is the data directory itself)."""

    name: str
    description: str
    files: tuple[FileEntry, ...]
    subdirs: tuple[str, ...] = field(default=())

    def dirs(self, data_dir: str | os.PathLike | None = None) -> list[Path]:
        """The absolute directories searched, in order (the first is the download target)."""
        root = data_root(data_dir)
        subs = self.subdirs or (self.name,)
        out = []
        for s in (*subs, ""):
            p = (root / s) if s else root
            if p not in out:
                out.append(p)
        return out

    def target(self, data_dir: str | os.PathLike | None = None) -> Path:
        return self.dirs(data_dir)[0]


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` (made absolute), else ``$GRADSPARSE_DATA``, else ``~/.cache/gradsparse``."""
    if data_dir is not None:
        return Path(data_dir).expanduser().absolute()
    env = os.environ.get("GRADSPARSE_DATA")
    return (Path(env).expanduser() if env else Path("~/.cache/gradsparse").expanduser()).absolute()


def _idx(mirrors, md5s) -> tuple[FileEntry, ...]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return tuple(FileEntry(f"{n}.gz", tuple(m + f"{n}.gz" for m in mirrors), f"md5:{h}", ((n,),))
                 for n, h in zip(names, md5s))


def _libsvm(*names: str) -> tuple[FileEntry, ...]:
    return tuple(FileEntry(n, (LIBSVM_BINARY + n,), None, ((n[:-4],),) if n.endswith(".bz2") else ())
                 for n in names)


DATASETS: dict[str, DataSet] = {
    "mnist": DataSet(
        "mnist", "MNIST handwritten digits, 60,000 + 10,000 28x28 (IDX, gzip)",
        _idx(MNIST_MIRRORS, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
        ("mnist", "MNIST/raw", "MNIST"),
    ),
    "fashion_mnist": DataSet(
        "fashion_mnist", "Fashion-MNIST, 60,000 + 10,000 28x28 (IDX, gzip)",
        _idx(FASHION_MIRRORS, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                               "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
        ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST"),
    ),
    "cifar10": DataSet(
        "cifar10", "CIFAR-10, 50,000 + 10,000 32x32 RGB (python pickles in a tarball)",
        (FileEntry("cifar-10-python.tar.gz", (CIFAR10_URL + "cifar-10-python.tar.gz",),
                   "md5:c58f30108f718f92721af3b95e74349a", (CIFAR10_BATCHES,), extract=True),),
        ("cifar10", "cifar-10"),
    ),
    "gisette": DataSet("gisette", "gisette (LIBSVM, scaled): 6,000 + 1,000 rows, 5,000 features",
                       _libsvm("gisette_scale.bz2", "gisette_scale.t.bz2")),
    "madelon": DataSet("madelon", "madelon (LIBSVM): 2,000 + 600 rows, 500 features", _libsvm("madelon", "madelon.t")),
    "rcv1": DataSet("rcv1", "rcv1.binary (LIBSVM): 20,242 + 677,399 rows, 47,236 sparse features",
                    _libsvm("rcv1_train.binary.bz2", "rcv1_test.binary.bz2")),
}


def get(name: str) -> DataSet:
    """The registry entry ``name``; ValueError listing the allowed names otherwise."""
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[name]


def _present(folder: Path, entry: FileEntry) -> Path | None:
    """The path that stands for ``entry`` in ``folder`` (the file itself, or the first path of a
    complete alternative), or None."""
    if (folder / entry.name).is_file():
        return folder / entry.name
    for alt in entry.alternatives:
        if all((folder / a).is_file() for a in alt):
            return folder / alt[0]
    return None


def locate(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """{file name: path on disk} for every file of ``name``, all from the first searched directory
    that holds them all (a decompressed copy of a ``.bz2`` maps to its own path). Raises
    DataMissingError naming the missing files, the directories searched and the download command."""
    ds = get(name)
    dirs = ds.dirs(data_dir)
    for folder in dirs:
        found = {e.name: _present(folder, e) for e in ds.files}
        if all(found.values()):
            return found  # type: ignore[return-value]
    raise DataMissingError(name, [e.name for e in ds.files if _present(dirs[0], e) is None] or
                           [e.name for e in ds.files], dirs)


def missing(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Absolute paths (in the download directory) of the files of data set ``name`` that are not
    on disk; an empty list when all are present in one of the searched directories (see
    :meth:`DataSet.dirs`). Unknown ``name``: ValueError listing the allowed names."""
    ds = get(name)
    dirs = ds.dirs(data_dir)
    for folder in dirs:
        if all(_present(folder, e) is not None for e in ds.files):
            return []
    return [str(dirs[0] / e.name) for e in ds.files if _present(dirs[0], e) is None]
