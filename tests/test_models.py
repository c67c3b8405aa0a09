"""The papers' models: exact parameter counts (against the papers' numbers and against hand
formulas written here, independent of the model code), forward shapes, one SGD step on the small
variants, and paper 003's vmappable models through ``module_task``."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from gradsparse.tasks import TASKS, make_task
from gradsparse.tasks.architectures import (
    ARCHITECTURES,
    PAPER_MODELS,
    VGG19_CONFIG,
    count_module_params,
    lstm_tiny,
    lstm_wikitext2,
    parameter_count,
    resnet20_cifar,
    resnet_small_cifar,
)
from gradsparse.tasks.models import FashionCNN, MnistCNN, fashion_mlp, init_module_params, module_task

# ------------------------------------------------------------------------------------------
# hand formulas (independent of the model code)
# ------------------------------------------------------------------------------------------


def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def linear(a, b):
    return a * b + b


def mlp(*widths):
    return sum(linear(a, b) for a, b in zip(widths[:-1], widths[1:]))


def resnet_cifar_formula(blocks, width, n_classes=10):
    """kuangliu-style CIFAR ResNet: stem conv3x3 + BN, BasicBlocks with 1x1-conv + BN projections."""
    n = conv(3, width, 3, bias=False) + bn(width)
    cin = width
    for i, nb in enumerate(blocks):
        planes = width * 2**i
        for j in range(nb):
            stride = 1 if i == 0 or j > 0 else 2
            n += conv(cin, planes, 3, False) + bn(planes) + conv(planes, planes, 3, False) + bn(planes)
            if stride != 1 or cin != planes:
                n += conv(cin, planes, 1, False) + bn(planes)
            cin = planes
    return n + linear(cin, n_classes)


def resnet_a_formula(n_blocks, n_classes=10):
    """He et al. 2016 CIFAR ResNet 6n+2, option A (parameter-free) shortcuts."""
    total = conv(3, 16, 3, False) + bn(16)
    cin = 16
    for planes in (16, 32, 64):
        for _ in range(n_blocks):
            total += conv(cin, planes, 3, False) + bn(planes) + conv(planes, planes, 3, False) + bn(planes)
            cin = planes
    return total + linear(64, n_classes)


def vgg_formula(cfg, n_classes=10):
    total, cin = 0, 3
    for v in cfg:
        if v != "M":
            total += conv(cin, v, 3) + bn(v)
            cin = v
    return total + linear(cin, n_classes)


def lstm_lm_formula(vocab, emb, hidden, layers, tied):
    lstm = sum(4 * hidden * ((emb if i == 0 else hidden) + hidden) + 2 * 4 * hidden for i in range(layers))
    return vocab * emb + lstm + (hidden * vocab if not tied else 0) + vocab


HAND = {
    "lenet_mnist": conv(1, 6, 5) + conv(6, 16, 5) + mlp(16 * 5 * 5, 120, 84, 10),
    "resnet18_cifar": resnet_cifar_formula((2, 2, 2, 2), 64),
    "resnet110_cifar": resnet_a_formula(18),
    "lstm_wikitext2": lstm_lm_formula(33_278, 650, 650, 2, tied=False),
    "mlp_mnist": mlp(784, 64, 10),
    "cnn_mnist_paper003": conv(1, 32, 3) + conv(32, 64, 3) + mlp(64 * 12 * 12, 128, 10),
    "cnn_fashion_paper003": conv(1, 16, 5) + bn(16) + conv(16, 32, 5) + bn(32) + linear(32 * 7 * 7, 10),
    "mlp_fashion_paper003": mlp(784, 256, 128, 64, 10),
    "vgg19_cifar": vgg_formula(VGG19_CONFIG),
}

# the numbers as the papers (or, where a paper is silent, our docstrings) state them
STATED = {
    "lenet_mnist": 61_706,
    "resnet18_cifar": 11_173_962,
    "resnet110_cifar": 1_727_962,
    "lstm_wikitext2": 50_065_078,
    "mlp_mnist": 50_890,
    "cnn_mnist_paper003": 1_199_882,
    "cnn_fashion_paper003": 29_034,
    "mlp_fashion_paper003": 242_762,
    "vgg19_cifar": 20_040_522,
}


def test_tables_cover_the_same_models():
    assert set(PAPER_MODELS) == set(HAND) == set(STATED)


@pytest.mark.parametrize("name", sorted(STATED))
def test_parameter_count_is_the_papers(name):
    builder, expected, source = PAPER_MODELS[name]
    assert expected == STATED[name] == HAND[name], (name, expected, HAND[name])
    assert parameter_count(name) == expected
    assert source


def test_small_variant_counts():
    assert parameter_count("resnet_small_cifar") == resnet_cifar_formula((1, 1, 1, 1), 16) == 308_826
    assert parameter_count("resnet20_cifar") == resnet_a_formula(3) == 269_722
    assert parameter_count("lstm_tiny") == lstm_lm_formula(100, 32, 32, 2, False) == 23_396
    assert count_module_params(lstm_tiny(tie_weights=True)) == lstm_lm_formula(100, 32, 32, 2, True) == 20_196
    assert parameter_count("lstm_wikitext2_tied") == lstm_lm_formula(33_278, 650, 650, 2, True) == 28_434_378


def test_mnist_cnn_on_8x8_digits_count():
    assert count_module_params(MnistCNN(8)) == conv(1, 32, 3) + conv(32, 64, 3) + mlp(64 * 2 * 2, 128, 10) == 53_002


def test_parameter_count_unknown_name():
    with pytest.raises(ValueError, match="resnet9000"):
        parameter_count("resnet9000")


# ------------------------------------------------------------------------------------------
# forward shapes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18_cifar", "vgg19_cifar", "resnet110_cifar", "resnet_small_cifar",
                                  "resnet20_cifar"])
def test_cifar_forward_shape(name):
    torch.manual_seed(0)
    model = ARCHITECTURES[name]().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_lstm_forward_shapes():
    torch.manual_seed(0)
    tiny = lstm_tiny()
    tokens = torch.randint(0, 100, (7, 2))  # [seq, batch]
    logits, (h, c) = tiny(tokens, return_state=True)
    assert logits.shape == (7, 2, 100) and h.shape == c.shape == (2, 2, 32)
    big = lstm_wikitext2(tie_weights=True).eval()
    assert big.out.weight is big.embedding.weight
    with torch.no_grad():
        out = big(torch.randint(0, 33_278, (3, 2)))
    assert out.shape == (3, 2, 33_278)
    with pytest.raises(ValueError, match="tie_weights"):
        type(tiny)(100, 16, 32, tie_weights=True)


@pytest.mark.parametrize("name,image", [("cnn_mnist_paper003", 28), ("cnn_fashion_paper003", 28),
                                        ("mlp_fashion_paper003", 28), ("lenet_mnist", 28)])
def test_mnist_model_forward_shape(name, image):
    out = PAPER_MODELS[name][0]()(torch.rand(2, 1, image, image))
    assert out.shape == (2, 10)


# ------------------------------------------------------------------------------------------
# one SGD step lowers the loss (small variants, plain torch training mode)
# ------------------------------------------------------------------------------------------


def _loss_drops(model, x, y, lr, loss_fn):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    before = loss_fn(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn(model(x), y)
    return float(before.detach()), float(after)


@pytest.mark.parametrize("builder", [resnet_small_cifar, resnet20_cifar])
def test_sgd_step_lowers_loss_cifar_small(builder):
    torch.manual_seed(0)
    model = builder()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    before, after = _loss_drops(model, x, y, 0.05, F.cross_entropy)
    assert after < before


def test_sgd_step_lowers_loss_lstm_tiny():
    torch.manual_seed(0)
    model = lstm_tiny()
    tokens = torch.randint(0, 100, (9, 4))
    x, y = tokens[:-1], tokens[1:]
    before, after = _loss_drops(model, x, y, 0.5,
                                lambda logits, t: F.cross_entropy(logits.reshape(-1, 100), t.reshape(-1)))
    assert after < before


# ------------------------------------------------------------------------------------------
# paper 003's models in the functional (vmapped) simulator
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,d", [(lambda: MnistCNN(28), 1_199_882), (lambda: FashionCNN(28), 29_034),
                                    (lambda: fashion_mlp(784), 242_762)])
def test_paper003_models_through_module_task(make, d):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 28, 28, generator=g)
    y = torch.arange(6) % 10
    task = module_task("t", make(), x, y, x, y)
    assert task.info["d"] == d
    params = task.init_params(torch.Generator().manual_seed(1))
    assert sum(p.numel() for p in params.values()) == d
    assert all(p.dtype == torch.float32 for p in params.values())
    X, Y = x.reshape(2, 3, 1, 28, 28), y.reshape(2, 3)
    # shared params, one batch per worker (the simulator's call) == each worker's own gradient
    gs = vmap(grad(task.loss), in_dims=(None, 0, 0))(params, X, Y)
    for w in range(2):
        own = grad(task.loss)(params, X[w], Y[w])
        for k in params:
            assert gs[k].shape == (2, *params[k].shape)
            torch.testing.assert_close(gs[k][w], own[k], rtol=1e-4, atol=1e-6)
    # two workers' own parameters
    stacked = {k: torch.stack([v, v + 0.01]) for k, v in params.items()}
    losses = vmap(task.loss)(stacked, X, Y)
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    # a small gradient step lowers the loss on the batch
    full = grad(task.loss)(params, x, y)
    stepped = {k: v - 0.01 * full[k] for k, v in params.items()}
    assert float(task.loss(stepped, x, y)) < float(task.loss(params, x, y))


def test_fashion_cnn_batch_norm_init_and_running_stats_refused():
    params = init_module_params(FashionCNN(28), torch.Generator().manual_seed(0))
    assert torch.equal(params["bn1.weight"], torch.ones(16)) and torch.equal(params["bn2.bias"], torch.zeros(32))
    assert list(params) == [n for n, _ in FashionCNN(28).named_parameters()]
    assert not list(FashionCNN(28).buffers())  # no running statistics
    with pytest.raises(TypeError, match="running statistics"):
        init_module_params(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), torch.Generator())


def test_init_of_existing_models_unchanged_by_batch_norm_support():
    """The draw order of Linear/Conv layers is what it was (same values as a by-hand draw)."""
    g = torch.Generator().manual_seed(3)
    params = init_module_params(MnistCNN(28), g)
    g2 = torch.Generator().manual_seed(3)
    u = torch.rand((32, 1, 3, 3), generator=g2)
    torch.testing.assert_close(params["conv1.weight"], (2 * u - 1) / 3.0)


# ------------------------------------------------------------------------------------------
# registered tasks
# ------------------------------------------------------------------------------------------


def _write_idx(path, arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


def _fake_idx(folder, n_train=12, n_test=6, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


@pytest.mark.parametrize("name,folder,d", [("mnist_cnn_paper003", "mnist", 1_199_882),
                                           ("fashion_mnist_cnn_paper003", "FashionMNIST/raw", 29_034),
                                           ("fashion_mnist_mlp_paper003", "FashionMNIST/raw", 242_762)])
def test_paper003_tasks_from_idx_files(tmp_path, name, folder, d):
    _fake_idx(tmp_path / folder)
    assert name in TASKS
    task = make_task(name, data_dir=tmp_path, n_train=8, seed=1)
    assert task.name == name and task.info["d"] == d and task.info["paper"] == "003"
    assert task.train_x.shape == (8, 1, 28, 28) and task.test_x.shape == (6, 1, 28, 28)
    logits = task.predict(task.init_params(torch.Generator().manual_seed(0)), task.test_x)
    assert logits.shape == (6, 10)


def test_mnist5k_cnn_paper003_offline():
    task = make_task("mnist5k_cnn_paper003", n_train=20)
    side = task.train_x.shape[-1]
    assert task.info["d"] == (1_199_882 if side == 28 else 53_002)
    assert task.train_x.shape[0] == 20
