"""Training tasks: data sets, worker splits, models and convex problems with a known optimum.

    from gradsparse.tasks import make_task, split_workers
    task = make_task("logreg", dataset="madelon_like", seed=0)
    parts = split_workers(task.n_train, task.train_y, 20, "iid", generator=torch.Generator().manual_seed(0))

Every builder in :data:`TASKS` takes keyword options with defaults and ``seed: int = 0``; the
task is a deterministic function of its options. A name of the form ``module.path:function`` or
``path/to/file.py:function`` builds a task from the user's own code (:mod:`.user`). Tensors are float32 (convex tasks accept
``dtype="float64"``); class labels are int64, regression targets float32, logistic-regression
training labels +-1.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from .base import Task
from .convex import linreg, logreg, solve_logreg, toy_quadratic
from .idx import default_data_dir, find_idx_files, load_idx_dataset, read_idx
from .splits import SPLITS, split_workers
from .user import UserTaskError, is_user_task_name, make_user_task, task_from
from .vision import (
    digits_cnn,
    digits_lenet,
    digits_mlp,
    fashion_mnist_cnn,
    fashion_mnist_lenet,
    fashion_mnist_mlp,
    mnist_cnn,
    mnist_lenet,
    mnist_mlp,
    mnist5k_cnn,
    mnist5k_lenet,
    mnist5k_mlp,
    mnist_cnn_paper003,
    fashion_mnist_cnn_paper003,
    fashion_mnist_mlp_paper003,
    mnist5k_cnn_paper003,
)

TASKS: dict[str, Callable[..., Task]] = {
    "toy_quadratic": toy_quadratic,
    "linreg": linreg,
    "logreg": logreg,
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "digits_lenet": digits_lenet,
    "mnist_mlp": mnist_mlp,
    "mnist_cnn": mnist_cnn,
    "mnist_lenet": mnist_lenet,
    "fashion_mnist_mlp": fashion_mnist_mlp,
    "fashion_mnist_cnn": fashion_mnist_cnn,
    "fashion_mnist_lenet": fashion_mnist_lenet,
    "mnist5k_mlp": mnist5k_mlp,
    "mnist5k_cnn": mnist5k_cnn,
    "mnist5k_lenet": mnist5k_lenet,
    # paper 003's exact models (d = 1,199,882 / 29,034 / 242,762), see tasks.models
    "mnist_cnn_paper003": mnist_cnn_paper003,
    "fashion_mnist_cnn_paper003": fashion_mnist_cnn_paper003,
    "fashion_mnist_mlp_paper003": fashion_mnist_mlp_paper003,
    "mnist5k_cnn_paper003": mnist5k_cnn_paper003,
}


def task_options(name: str) -> dict[str, Any]:
    """The options of task ``name`` with their defaults."""
    builder = _builder(name)
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()}


def unknown_task_message(name: str) -> str:
    return (f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}, or your own as "
            "'my_pkg.my_module:make_task' or 'path/to/file.py:make_task'")


def _builder(name: str) -> Callable[..., Task]:
    if name not in TASKS:
        raise ValueError(unknown_task_message(name))
    return TASKS[name]


def make_task(name: str, **options: Any) -> Task:
    """Build task ``name`` with keyword ``options``: a built-in task of :data:`TASKS`, or a user
    task ``module.path:function`` / ``path/to/file.py:function`` (:func:`.user.make_user_task`).

    Raises ValueError for an unknown name (listing the allowed names), for an unknown option
    (listing the task's options) and, from the builder, for bad option values
    (:class:`~.user.UserTaskError`, a ValueError, for user tasks)."""
    if is_user_task_name(name):
        return make_user_task(name, **options)
    builder = _builder(name)
    allowed = task_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; allowed options: {sorted(allowed)}")
    return builder(**options)


def task_dimension(name: str, options: dict[str, Any]) -> tuple[int, int] | None:
    """(d, bytes per parameter) of task ``name`` with ``options``, read from the options alone
    (nothing is built), for the tasks whose d the options fix: ``toy_quadratic`` (dim),
    ``linreg`` (n_features) and ``logreg`` on a generated or fixed data set (its features); None
    for the others (their d is known once the task is built). Never more than the built task's d."""
    if name not in TASKS:
        return None
    opts = {**task_options(name), **options}
    elem = 8 if opts.get("dtype") in ("float64", "double") else 4
    try:
        if name == "toy_quadratic":
            return int(opts["dim"]), elem
        if name == "linreg":
            return int(opts["n_features"]), elem
        if name == "logreg" and opts.get("libsvm_path") is None:
            fixed = {"breast_cancer": 30, "mnist_4v9": 784}
            default = {"gisette_like": 5000, "madelon_like": 500}
            dataset = opts.get("dataset")
            if dataset in fixed:
                return fixed[dataset], elem
            if dataset in default:
                return int(opts.get("n_features") or default[dataset]), elem
    except (TypeError, ValueError, KeyError):
        return None
    return None


__all__ = [
    "task_dimension",
    "Task",
    "TASKS",
    "SPLITS",
    "make_task",
    "task_options",
    "task_from",
    "make_user_task",
    "is_user_task_name",
    "UserTaskError",
    "split_workers",
    "toy_quadratic",
    "linreg",
    "logreg",
    "solve_logreg",
    "digits_mlp",
    "digits_cnn",
    "digits_lenet",
    "mnist_mlp",
    "mnist_cnn",
    "mnist_lenet",
    "fashion_mnist_mlp",
    "fashion_mnist_cnn",
    "fashion_mnist_lenet",
    "mnist5k_mlp",
    "mnist5k_cnn",
    "mnist5k_lenet",
    "mnist_cnn_paper003",
    "fashion_mnist_cnn_paper003",
    "fashion_mnist_mlp_paper003",
    "mnist5k_cnn_paper003",
    "read_idx",
    "find_idx_files",
    "load_idx_dataset",
    "default_data_dir",
]
