"""Tests for gradsparse.tasks: convex optima, worker splits, vmappable losses, IDX reading."""

from __future__ import annotations

import gzip
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from gradsparse.tasks import (
    TASKS,
    Task,
    make_task,
    read_idx,
    split_workers,
    task_options,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full_loss(task: Task, params) -> torch.Tensor:
    return task.loss(params, task.train_x, task.train_y)


def to64(d):
    return {k: v.double() for k, v in d.items()}


def grad64(task: Task, params) -> torch.Tensor:
    """Full-data gradient of the task's loss evaluated in float64."""
    x, y = task.train_x.double(), task.train_y.double()
    g = grad(lambda p: task.loss(p, x, y))(to64(params))
    return torch.cat([v.reshape(-1) for v in g.values()])


# ------------------------------------------------------------------------------------------
# registry and errors
# ------------------------------------------------------------------------------------------


def test_registry_names():
    expected = {"toy_quadratic", "linreg", "logreg", "digits_mlp", "digits_cnn", "digits_lenet",
                "mnist_mlp", "mnist_cnn", "fashion_mnist_mlp", "fashion_mnist_cnn"}
    assert expected <= set(TASKS)
    for name in TASKS:
        assert "seed" in task_options(name), name
        assert task_options(name)["seed"] == 0


def test_unknown_task_name_lists_allowed():
    with pytest.raises(ValueError) as e:
        make_task("resnet9000")
    msg = str(e.value)
    assert "resnet9000" in msg and "toy_quadratic" in msg and "digits_mlp" in msg


def test_unknown_option_lists_allowed():
    with pytest.raises(ValueError) as e:
        make_task("toy_quadratic", centres=(1, 2))
    msg = str(e.value)
    assert "centres" in msg and "centers" in msg and "w0" in msg


@pytest.mark.parametrize(
    "name, opts, needle",
    [
        ("logreg", {"dataset": "bogus"}, "bogus"),
        ("logreg", {"dataset": "breast_cancer", "test_fraction": 1.5}, "1.5"),
        ("linreg", {"n_features": 0}, "n_features"),
        ("toy_quadratic", {"dim": 3, "w0": [1.0, 2.0]}, "dim=3"),
        ("toy_quadratic", {"dtype": "float16"}, "float16"),
        ("digits_cnn", {"channels": (8,)}, "channels"),
        ("digits_mlp", {"hidden": -3}, "-3"),
    ],
)
def test_bad_option_values(name, opts, needle):
    with pytest.raises(ValueError) as e:
        make_task(name, **opts)
    assert needle in str(e.value)


def test_bad_dataset_message_lists_allowed():
    with pytest.raises(ValueError) as e:
        make_task("logreg", dataset="bogus")
    assert "gisette_like" in str(e.value) and "breast_cancer" in str(e.value)


# ------------------------------------------------------------------------------------------
# toy quadratic
# ------------------------------------------------------------------------------------------


def test_toy_quadratic_optimum():
    task = make_task("toy_quadratic")
    assert task.f_star == pytest.approx(6100 / 9, rel=1e-15)
    assert task.info["f_star_exact"] == "6100/9"
    assert task.train_x.shape == (3, 1) and task.train_x.dtype == torch.float32
    w_star = task.x_star["w"]
    assert w_star.shape == (100,)
    torch.testing.assert_close(w_star, torch.full((100,), 16 / 3))
    assert float(full_loss(task, {"w": torch.full((100,), 16 / 3)})) == pytest.approx(6100 / 9, rel=1e-6)
    # exact in float64
    t64 = make_task("toy_quadratic", dtype="float64")
    w = {"w": torch.full((100,), 16 / 3, dtype=torch.float64)}
    assert float(full_loss(t64, w)) == pytest.approx(6100 / 9, rel=1e-13)
    # f* is the minimum: gradient zero there, larger elsewhere
    assert float(grad64(t64, w).abs().max()) < 1e-12
    assert float(full_loss(t64, {"w": w["w"] + 0.1})) > t64.f_star


def test_toy_quadratic_workers_and_start():
    task = make_task("toy_quadratic", w0=2.5)
    assert [int(i) for i in torch.cat(task.worker_data)] == [0, 1, 2]
    p = task.init_params(gen(123))
    torch.testing.assert_close(p["w"], torch.full((100,), 2.5))
    # worker q's gradient is w - c_q
    for q, c in enumerate((1.0, 5.0, 10.0)):
        idx = task.worker_data[q]
        g = grad(task.loss)(p, task.train_x[idx], task.train_y[idx])["w"]
        torch.testing.assert_close(g, torch.full((100,), 2.5 - c))
    w0 = list(np.linspace(-1, 1, 7))
    t = make_task("toy_quadratic", dim=7, w0=w0, centers=(0.0, 2.0))
    torch.testing.assert_close(t.init_params(gen())["w"], torch.tensor(w0, dtype=torch.float32))
    assert t.f_star == pytest.approx(float(Fraction(7, 2) * 1))  # var of (0, 2) is 1


# ------------------------------------------------------------------------------------------
# linear regression
# ------------------------------------------------------------------------------------------


def test_linreg_optimum():
    task = make_task("linreg", n_samples=600, n_features=40, noise=0.3, seed=3)
    assert task.train_x.shape == (600, 40) and task.train_x.dtype == torch.float32
    assert task.train_y.dtype == torch.float32 and task.test_x is None
    g = grad64(task, task.x_star)
    assert float(g.norm()) < 1e-5  # float32-rounded x_star, gradient taken in float64
    t64 = make_task("linreg", n_samples=600, n_features=40, noise=0.3, seed=3, dtype="float64")
    assert float(grad64(t64, t64.x_star).norm()) < 1e-12
    assert float(full_loss(t64, t64.x_star)) == pytest.approx(t64.f_star, rel=1e-12)
    # noise variance recovered: f* ~ noise^2/2 * (n - d)/n
    assert t64.f_star == pytest.approx(0.5 * 0.09 * (560 / 600), rel=0.2)
    A = t64.train_x.numpy()
    eig = np.linalg.eigvalsh(A.T @ A / 600)
    assert t64.info["L"] == pytest.approx(eig[-1], rel=1e-10)
    assert t64.info["mu"] == pytest.approx(eig[0], rel=1e-8)


def test_linreg_test_split():
    task = make_task("linreg", n_samples=200, n_features=5, test_fraction=0.25)
    assert task.train_x.shape == (150, 5) and task.test_x.shape == (50, 5)


# ------------------------------------------------------------------------------------------
# logistic regression
# ------------------------------------------------------------------------------------------

SMALL_LOGREG = [
    {"dataset": "breast_cancer"},
    {"dataset": "gisette_like", "n_samples": 250, "n_features": 400},  # n < d: Woodbury Newton
    {"dataset": "madelon_like", "n_samples": 400, "n_features": 60},  # n > d: full Newton
]


@pytest.mark.parametrize("opts", SMALL_LOGREG)
def test_logreg_optimum(opts):
    t64 = make_task("logreg", dtype="float64", **opts)
    assert float(grad64(t64, t64.x_star).norm()) < 1e-6
    assert t64.info["fstar_grad_norm"] < 1e-9
    assert float(full_loss(t64, t64.x_star)) == pytest.approx(t64.f_star, rel=1e-12)
    # f* below f at random points and at small perturbations of x*
    g = gen(5)
    d = t64.x_star["w"].numel()
    for scale in (1e-3, 1e-1, 1.0):
        for _ in range(3):
            w = t64.x_star["w"] + scale * torch.randn(d, generator=g, dtype=torch.float64)
            assert float(full_loss(t64, {"w": w})) > t64.f_star
    assert float(full_loss(t64, {"w": torch.zeros(d, dtype=torch.float64)})) == pytest.approx(np.log(2) + 0.0)

    # float32 version: same data and f*, float32 tensors, labels +-1
    t32 = make_task("logreg", **opts)
    assert t32.train_x.dtype == torch.float32 and t32.x_star["w"].dtype == torch.float32
    assert set(t32.train_y.unique().tolist()) == {-1.0, 1.0}
    assert t32.f_star == pytest.approx(t64.f_star, rel=1e-6)
    assert float(full_loss(t32, t32.x_star)) == pytest.approx(t32.f_star, rel=1e-5)


def test_logreg_smoothness_constants():
    task = make_task("logreg", dataset="breast_cancer", dtype="float64")
    A = task.train_x.numpy()
    n = A.shape[0]
    lam = np.linalg.eigvalsh(A.T @ A).max()
    mu = 1e-4 * lam / (4 * n)
    assert task.info["mu"] == pytest.approx(mu, rel=1e-10)
    assert task.info["L"] == pytest.approx(mu + lam / (4 * n), rel=1e-10)
    assert task.info["step"] == pytest.approx(1 / task.info["L"], rel=1e-12)
    # the Hessian at x* (and at 0, where sigma' is largest) lies between mu and L
    x, y = task.train_x, task.train_y
    for w in (task.x_star["w"], torch.zeros(A.shape[1], dtype=torch.float64)):
        H = torch.autograd.functional.hessian(lambda v: task.loss({"w": v}, x, y), w)
        ev = torch.linalg.eigvalsh(H)
        assert float(ev.min()) >= task.info["mu"] * (1 - 1e-9)
        assert float(ev.max()) <= task.info["L"] * (1 + 1e-9)
    # at 0 the bound is attained: sigma'(0) = 1/4
    assert float(ev.max()) == pytest.approx(task.info["L"], rel=1e-9)
    # other mu_factor
    t2 = make_task("logreg", dataset="breast_cancer", mu_factor=1e-2)
    assert t2.info["mu"] == pytest.approx(1e-2 * lam / (4 * n), rel=1e-5)


def test_logreg_predict_and_test_labels():
    task = make_task("logreg", dataset="breast_cancer")
    assert task.test_x.shape[0] == pytest.approx(0.2 * 569, abs=1)
    assert task.test_y.dtype == torch.int64 and set(task.test_y.unique().tolist()) <= {0, 1}
    logits = task.predict(task.x_star, task.test_x)
    assert logits.shape == (task.test_x.shape[0], 2)
    acc = float((logits.argmax(1) == task.test_y).float().mean())
    assert acc > 0.9
    # training labels and predict agree in sign convention
    z = task.train_x @ task.x_star["w"]
    train_acc = float(((z > 0).float() * 2 - 1 == task.train_y).float().mean())
    assert train_acc > 0.95


def test_logreg_libsvm_file(tmp_path):
    from sklearn.datasets import dump_svmlight_file

    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 6))
    y = (X[:, 0] + 0.5 * rng.standard_normal(80) > 0).astype(int)  # labels {0, 1}
    path = tmp_path / "toy.svm"
    dump_svmlight_file(X, y, str(path))
    task = make_task("logreg", libsvm_path=str(path))
    assert task.train_x.shape == (80, 6) and task.test_x is None
    assert task.train_y.tolist() == [1.0 if v else -1.0 for v in y]
    torch.testing.assert_close(task.train_x, torch.tensor(X, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    assert task.info["fstar_grad_norm"] < 1e-9
    with pytest.raises(FileNotFoundError) as e:
        make_task("logreg", libsvm_path=str(tmp_path / "missing.svm"))
    assert "missing.svm" in str(e.value)


# ------------------------------------------------------------------------------------------
# worker splits
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows, n_workers", [(100, 7), (10, 10), (1438, 20)])
def test_split_iid_is_partition(n_rows, n_workers):
    parts = split_workers(n_rows, None, n_workers, "iid", generator=gen(1))
    assert len(parts) == n_workers
    assert all(p.dtype == torch.int64 for p in parts)
    allrows = torch.cat(parts)
    assert sorted(allrows.tolist()) == list(range(n_rows))  # disjoint and covering
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = split_workers(n_rows, None, n_workers, "iid", generator=gen(1))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = split_workers(n_rows, None, n_workers, "iid", generator=gen(2))
    assert n_workers == n_rows or any(not torch.equal(a, b) for a, b in zip(parts, other))


def test_split_shards_label_contiguous():
    labels = make_task("digits_mlp").train_y  # 10 classes, 1438 rows
    n, n_workers, spw = len(labels), 50, 2
    parts = split_workers(n, labels, n_workers, "shards", shards_per_worker=spw, generator=gen(0))
    assert sorted(torch.cat(parts).tolist()) == list(range(n))  # default n_shards uses every row
    # reconstruct the label-sorted shards and check each worker owns whole shards
    order = torch.sort(labels, stable=True).indices
    shard_of = torch.empty(n, dtype=torch.long)
    for s, rows in enumerate(torch.tensor_split(order, n_workers * spw)):
        shard_of[rows] = s
    n_few_labels = 0
    for p in parts:
        shards = shard_of[p].unique()
        assert len(shards) <= spw
        assert sum(int((shard_of == s).sum()) for s in shards) == len(p)  # whole shards
        n_few_labels += len(labels[p].unique()) <= 2
    assert n_few_labels >= 0.7 * n_workers
    # an iid split, by contrast, gives every worker many labels
    iid = split_workers(n, labels, n_workers, "iid", generator=gen(0))
    assert np.mean([len(labels[p].unique()) for p in iid]) > 6


def test_split_shards_more_shards_than_needed():
    labels = torch.arange(10).repeat_interleave(60)  # 600 rows, sorted labels
    parts = split_workers(600, labels, 5, "shards", shards_per_worker=2, n_shards=20, generator=gen(3))
    rows = torch.cat(parts)
    assert len(rows) == 5 * 2 * 30 and len(rows.unique()) == len(rows)
    for p in parts:
        assert len(p) == 60
        assert len(labels[p].unique()) <= 2


@pytest.mark.parametrize(
    "args, kwargs, needle",
    [
        ((5, None, 6, "iid"), {}, "n_workers=6"),
        ((5, None, 2, "dirichlet"), {}, "dirichlet"),
        ((10, None, 2, "shards"), {}, "labels"),
        ((10, list(range(10)), 2, "shards"), {"n_shards": 3}, "n_shards=3"),
        ((10, list(range(9)), 2, "shards"), {}, "labels has 9"),
        ((10, None, 0, "iid"), {}, "n_workers"),
        ((10, list(range(10)), 2, "shards"), {"shards_per_worker": 0}, "shards_per_worker"),
    ],
)
def test_split_errors(args, kwargs, needle):
    with pytest.raises(ValueError) as e:
        split_workers(*args, generator=gen(), **kwargs)
    assert needle in str(e.value)
    if "dirichlet" in needle:
        assert "iid" in str(e.value) and "shards" in str(e.value)


# ------------------------------------------------------------------------------------------
# vmap over workers
# ------------------------------------------------------------------------------------------


def _worker_batches(task: Task, n_workers: int, b: int):
    parts = split_workers(task.n_train, task.train_y, n_workers, "iid", generator=gen(7))
    idx = torch.stack([p[:b] for p in parts])
    return task.train_x[idx], task.train_y[idx]


@pytest.mark.parametrize(
    "name, opts",
    [
        ("digits_mlp", {}),
        ("digits_cnn", {}),
        ("digits_lenet", {}),
        ("logreg", {"dataset": "breast_cancer"}),
        ("linreg", {"n_samples": 200, "n_features": 10}),
    ],
)
def test_vmapped_worker_gradients_match_loop(name, opts):
    task = make_task(name, **opts)
    params = task.init_params(gen(11))
    if name in ("logreg", "linreg"):
        params = {"w": 0.1 * torch.randn(params["w"].shape, generator=gen(2))}
    X, Y = _worker_batches(task, n_workers=5, b=8)
    g_fn = grad(lambda p, x, y: task.loss(p, x, y))
    batched = vmap(g_fn, in_dims=(None, 0, 0))(params, X, Y)
    for q in range(X.shape[0]):
        single = g_fn(params, X[q], Y[q])
        for k in params:
            assert batched[k].shape == (X.shape[0], *params[k].shape)
            torch.testing.assert_close(batched[k][q], single[k], rtol=1e-5, atol=1e-6)
    assert any(float(v.abs().sum()) > 0 for v in batched.values())


def test_toy_vmapped_worker_gradients():
    task = make_task("toy_quadratic")
    X = task.train_x[torch.stack(task.worker_data)]  # [3, 1, 1]
    Y = task.train_y[torch.stack(task.worker_data)]
    p = task.init_params(gen())
    g = vmap(grad(task.loss), in_dims=(None, 0, 0))(p, X, Y)["w"]
    # default start w0 = 20 * 1 (the start that reproduces paper 003's numbers): grad F^q = 20 - c_q
    torch.testing.assert_close(p["w"], torch.full((100,), 20.0))
    torch.testing.assert_close(g, (20.0 - torch.tensor([1.0, 5.0, 10.0]))[:, None].expand(3, 100))
    # mean of the worker gradients is the gradient of F
    torch.testing.assert_close(g.mean(0), grad(task.loss)(p, task.train_x, task.train_y)["w"])


# ------------------------------------------------------------------------------------------
# image models
# ------------------------------------------------------------------------------------------


def test_digits_shapes_and_training_signal():
    task = make_task("digits_mlp")
    assert task.train_x.shape == (1438, 1, 8, 8) and task.test_x.shape == (359, 1, 8, 8)
    assert task.train_x.dtype == torch.float32 and task.train_y.dtype == torch.int64
    assert float(task.train_x.min()) == 0.0 and float(task.train_x.max()) == 1.0
    assert task.info["d"] == 64 * 64 + 64 + 64 * 10 + 10
    # class balance of the stratified split
    counts = torch.bincount(task.test_y, minlength=10)
    assert int(counts.min()) >= 34
    # a few full-batch gradient steps reduce the loss (the functional model trains)
    p = task.init_params(gen(0))
    l0 = float(full_loss(task, p))
    assert l0 == pytest.approx(np.log(10), abs=0.3)
    g_fn = grad(task.loss)
    for _ in range(30):
        g = g_fn(p, task.train_x, task.train_y)
        p = {k: p[k] - 0.5 * g[k] for k in p}
    assert float(full_loss(task, p)) < 0.8 * l0
    logits = task.predict(p, task.test_x)
    assert logits.shape == (359, 10)


def test_init_params_deterministic_and_default_scale():
    task = make_task("digits_cnn")
    state = torch.get_rng_state()
    a = task.init_params(gen(4))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    b = task.init_params(gen(4))
    c = task.init_params(gen(5))
    assert list(a) == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "out.weight", "out.bias"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert all(v.dtype == torch.float32 for v in a.values())
    # PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(a["conv2.weight"].abs().max()) <= 1 / np.sqrt(8 * 9)
    assert float(a["conv2.weight"].abs().max()) > 0.9 / np.sqrt(8 * 9)


def test_determinism_of_data():
    a = make_task("digits_mlp", seed=0)
    b = make_task("digits_mlp", seed=0)
    c = make_task("digits_mlp", seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_y, c.train_y)
    la = make_task("linreg", n_samples=100, n_features=4, seed=0)
    lb = make_task("linreg", n_samples=100, n_features=4, seed=0)
    lc = make_task("linreg", n_samples=100, n_features=4, seed=1)
    assert torch.equal(la.train_x, lb.train_x) and torch.equal(la.x_star["w"], lb.x_star["w"])
    assert not torch.equal(la.train_x, lc.train_x)
    ga = make_task("logreg", dataset="madelon_like", n_samples=200, n_features=30, seed=2)
    gb = make_task("logreg", dataset="madelon_like", n_samples=200, n_features=30, seed=2)
    gc = make_task("logreg", dataset="madelon_like", n_samples=200, n_features=30, seed=3)
    assert torch.equal(ga.train_x, gb.train_x) and ga.f_star == gb.f_star
    assert not torch.equal(ga.train_x, gc.train_x)


# ------------------------------------------------------------------------------------------
# IDX files (MNIST format)
# ------------------------------------------------------------------------------------------

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def write_idx(path, arr: np.ndarray, compress: bool = False) -> None:
    """Minimal IDX writer (test helper)."""
    arr = np.ascontiguousarray(arr)
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    with open(path, "wb") as fh:
        fh.write(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, dtype, compress):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, arr, compress)
    out = read_idx(path)
    assert out.shape == arr.shape and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_idx_rejects_bad_files(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)
    write_idx(p, np.zeros(5, dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(p)


def _fake_mnist(folder, n_train=30, n_test=12, compress=True, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sfx = ".gz" if compress else ""
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in data.items():
        write_idx(folder / (name + sfx), arr, compress)
    return data


def test_mnist_tasks_from_idx_files(tmp_path):
    data = _fake_mnist(tmp_path / "mnist", compress=True)
    task = make_task("mnist_mlp", data_dir=str(tmp_path))
    assert task.train_x.shape == (30, 1, 28, 28) and task.test_x.shape == (12, 1, 28, 28)
    assert task.info["d"] == 50_890
    np.testing.assert_allclose(task.train_x[:, 0].numpy(), data["train-images-idx3-ubyte"] / 255.0, rtol=1e-6)
    assert task.train_y.tolist() == data["train-labels-idx1-ubyte"].tolist()
    assert task.train_y.dtype == torch.int64
    cnn = make_task("mnist_cnn", data_dir=tmp_path, n_train=10, seed=1)
    assert cnn.train_x.shape == (10, 1, 28, 28)
    X, Y = _worker_batches(cnn, n_workers=2, b=3)
    g = vmap(grad(cnn.loss), in_dims=(None, 0, 0))(cnn.init_params(gen()), X, Y)
    assert g["conv1.weight"].shape == (2, 16, 1, 5, 5)
    lenet = make_task("mnist_lenet", data_dir=tmp_path)
    assert lenet.info["d"] == 61_706
    # Fashion-MNIST in torchvision's layout, raw (uncompressed) files
    _fake_mnist(tmp_path / "FashionMNIST" / "raw", compress=False, seed=1)
    f = make_task("fashion_mnist_mlp", data_dir=tmp_path)
    assert f.train_x.shape == (30, 1, 28, 28) and not torch.equal(f.train_x, task.train_x)


def test_mnist_missing_files_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSPARSE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        make_task("mnist_mlp")
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg and "nowhere" in msg
    with pytest.raises(FileNotFoundError):
        make_task("fashion_mnist_cnn", data_dir=tmp_path)


def test_linreg_without_a_gram_matrix_when_n_is_below_d(monkeypatch):
    """n < d: f*, L (and x*) from A A^T, or iteratively, equal the d x d Gram path's."""
    import numpy as np
    from scipy import linalg as sla

    from gradsparse.tasks import convex

    def gram_path(task):
        A = task.train_x.double().numpy()
        y = task.train_y.double().numpy()
        n = A.shape[0]
        eig = sla.eigvalsh(A.T @ A)
        w = sla.lstsq(A, y)[0]  # minimum-norm least squares
        return eig[-1] / n, 0.5 * np.mean((A @ w - y) ** 2), w

    kernel = make_task("linreg", n_samples=40, n_features=300, seed=2)
    L, f, w = gram_path(kernel)
    assert kernel.info["L"] == pytest.approx(L, rel=1e-10) and kernel.info["mu"] == 0.0
    assert kernel.f_star == pytest.approx(f, abs=1e-12)
    assert np.allclose(kernel.x_star["w"].double().numpy(), w, atol=1e-5)
    monkeypatch.setattr(convex, "_KERNEL_MAX_N", 10)  # force the iterative path
    iterative = make_task("linreg", n_samples=40, n_features=300, seed=2)
    assert iterative.info["L"] == pytest.approx(L, rel=1e-6)
    assert iterative.f_star == pytest.approx(f, abs=1e-10)
    assert np.allclose(iterative.x_star["w"].double().numpy(), w, atol=1e-5)
    # n > d is the Gram path as before
    tall = make_task("linreg", n_samples=300, n_features=40, seed=2)
    A = tall.train_x.double().numpy()
    assert tall.info["L"] == pytest.approx(sla.eigvalsh(A.T @ A)[-1] / 300, rel=1e-10) and tall.info["mu"] > 0


def _densify_rows(task) -> np.ndarray:
    """The sparse (column, value) rows of a linreg task as a dense float64 matrix."""
    x = task.train_x.double()
    n, m, _ = x.shape
    A = np.zeros((n, task.info["d"]))
    np.put_along_axis(A, x[..., 0].numpy().astype(np.int64), x[..., 1].numpy(), axis=1)
    return A


@pytest.mark.parametrize("n, d", [(40, 300), (300, 40)])  # n < d (minimum norm) and n > d
def test_linreg_sparse_rows_equal_the_dense_formulation(n, d):
    from scipy import linalg as sla

    task = make_task("linreg", n_samples=n, n_features=d, feature_density=0.1, seed=5, dtype="float64")
    m = task.info["nonzeros_per_row"]
    assert m == round(0.1 * d) and task.train_x.shape == (n, m, 2)
    cols = task.train_x[..., 0]
    assert bool((cols[:, 1:] > cols[:, :-1]).all())  # distinct columns, sorted, per row
    A, y = _densify_rows(task), task.train_y.numpy()
    assert np.count_nonzero(A) == n * m
    eig = sla.eigvalsh(A.T @ A if d <= n else A @ A.T)
    w = sla.lstsq(A, y)[0]  # minimum-norm least squares
    assert task.info["L"] == pytest.approx(eig[-1] / n, rel=1e-6)
    assert task.info["mu"] == (pytest.approx(eig[0] / n, rel=1e-5) if d <= n else 0.0)
    assert task.f_star == pytest.approx(0.5 * np.mean((A @ w - y) ** 2), abs=1e-10)
    assert np.allclose(task.x_star["w"].numpy(), w, atol=1e-7)
    # the loss on (column, value) rows is the dense loss, and so are its per-worker gradients
    wt = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    At = torch.as_tensor(A)
    dense = 0.5 * ((At @ wt - task.train_y) ** 2).mean()
    assert float(task.loss({"w": wt}, task.train_x, task.train_y)) == pytest.approx(float(dense), rel=1e-12)
    xs, ys = task.train_x[: 2 * (n // 2)].reshape(2, n // 2, m, 2), task.train_y[: 2 * (n // 2)].reshape(2, -1)
    g = vmap(grad(task.loss), in_dims=(None, 0, 0))({"w": wt}, xs, ys)["w"]
    for q in range(2):
        rows = At[q * (n // 2): (q + 1) * (n // 2)]
        torch.testing.assert_close(g[q], rows.T @ (rows @ wt - ys[q]) / (n // 2), rtol=1e-12, atol=1e-12)


def test_linreg_sparse_rows_scale_like_the_dense_design_and_refuse_what_cannot_fit():
    task = make_task("linreg", n_samples=2000, n_features=5000, feature_density=0.01, seed=0)
    vals = task.train_x[..., 1].double()
    assert float(vals.pow(2).mean()) * 0.01 == pytest.approx(1.0, rel=0.02)  # E[a_j^2] = 1 as when dense
    with pytest.raises(ValueError, match=r"needs about .* GiB, more than .*feature_density"):
        make_task("linreg", n_samples=10_000, n_features=100_000_000)  # 10^12 entries: refused before drawing
    with pytest.raises(ValueError, match="feature_density must be in"):
        make_task("linreg", feature_density=0.0)
    with pytest.raises(ValueError, match="2\\*\\*24"):
        make_task("linreg", n_samples=2, n_features=2**24 + 1, feature_density=1e-7)


def test_linreg_sparse_rows_train_on_the_simulator_towards_f_star():
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import TopK
    from gradsparse.engines.sync_sim import SyncSimulator
    from gradsparse.schedules import Schedule

    task = make_task("linreg", n_samples=400, n_features=100, feature_density=0.2, seed=1)
    sim = SyncSimulator(task, Algorithm(compressor=TopK(density=0.1), feedback="ef"),
                        Schedule(lr=0.5 * task.info["step"]), n_workers=4, batch_size="full")
    start = sim.full_loss() - task.f_star
    for _ in range(300):
        sim.step()
    assert sim.full_loss() - task.f_star < 1e-3 * start
