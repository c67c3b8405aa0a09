"""Tasks from the user's own code: ``task: {name: "my_pkg.my_module:make_task", options: {...}}``
or ``task: {name: "path/to/file.py:make_task"}``.

The contract (also in the README, section "Your own model and data")::

    def make_task(*, seed: int, **options) -> dict:
        return {
            "model": nn.Module,              # its parameters as built are the initial model x_0
            "loss": callable,                # (outputs, targets) -> mean loss; default cross-entropy
            "train": (x, y) or Dataset,      # tensors (or numpy arrays) with the samples first
            "test": (x, y) or Dataset,       # optional: test_accuracy (integer targets) is measured here
            "f_star": float,                 # optional: the optimal value of the training loss
            "info": {...},                   # optional: e.g. {"L": 4.0} for schedule.lr: 1/L
        }

or the functional form ``{"params": {name: tensor}, "loss": fn(params, x, y) -> mean loss,
"predict": fn(params, x) -> logits (optional), "train": ..., ...}``, or a
:class:`gradsparse.tasks.Task`. ``seed`` is the run's top-level ``seed`` (the function may leave
it out of its signature); ``options`` are ``task.options``. While the function runs, torch's,
NumPy's and Python's global random generators are seeded with ``seed`` (and restored after), so
a model built with PyTorch's default initialisation is fixed by the run's seed.

A module task behaves as a built-in one: ``loss(params, x, y) = loss_fn(functional_call(model,
params, x), y)``; the simulator uses the grouped per-worker gradients when every parameter
belongs to an ``nn.Linear`` (and the probe against ``vmap`` agrees), ``vmap(grad(loss))``
otherwise. The module runs in eval mode: layers whose training behaviour the vectorized
simulator cannot reproduce (dropout, batch norm with running statistics) are refused.

Everything is checked when the task is built, before a run writes anything: the import, the
function, the returned shape, the data (two tensors of equal length, or a Dataset of pairs), the
parameters (one floating dtype), and a probe of the loss on two training rows (a scalar, and
differentiable per worker with ``torch.func.vmap(grad(loss))``). A problem raises
:class:`UserTaskError` whose message is one line naming the task and what is wrong.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import random
import re
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .base import Task

__all__ = ["UserTaskError", "is_user_task_name", "parse_user_task_name", "load_user_function",
           "make_user_task", "task_from", "RETURN_KEYS"]

#: the keys a task function's dict may hold
RETURN_KEYS = ("model", "params", "loss", "predict", "train", "test", "f_star", "info")

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_RE = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*$")
_FUNCTION_RE = re.compile(rf"^{_IDENTIFIER}$")


class UserTaskError(ValueError):
    """A user task that cannot be loaded or has the wrong shape (one line)."""


def is_user_task_name(name: str) -> bool:
    """Whether ``name`` has the form of a user task (``module:function`` or ``file.py:function``)."""
    return isinstance(name, str) and ":" in name


def parse_user_task_name(name: str) -> tuple[str, str, bool]:
    """``"a.b:f"`` -> ("a.b", "f", False); ``"dir/x.py:f"`` -> ("dir/x.py", "f", True).

    The part before the last colon is a file path when it ends in ``.py`` or holds a path
    separator, else a dotted module name; the part after it is the function's name. Raises
    :class:`UserTaskError` for anything else."""
    where, sep, function = name.rpartition(":")
    if not sep or not where.strip():
        raise UserTaskError(f"task {name!r}: expected 'module.path:function' or 'path/to/file.py:function'")
    if not _FUNCTION_RE.match(function):
        raise UserTaskError(f"task {name!r}: {function!r} after the colon is not a Python function name")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    if not is_file and not _MODULE_RE.match(where):
        raise UserTaskError(f"task {name!r}: {where!r} is neither a dotted module name (my_pkg.my_module) "
                            "nor a .py file path")
    return where, function, is_file


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where_raised(exc: BaseException, root: str | None) -> str:
    """' at file.py:LINE': the innermost frame in the user's file ``root`` (any file but
    Python's own import machinery when ``root`` is None); '' for a SyntaxError, whose message
    already names the file and line."""
    if isinstance(exc, SyntaxError):
        return ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    if root is not None:
        frames = [f for f in frames if os.path.abspath(f.filename) == root]
    if not frames:
        return ""
    return f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}"


def load_user_function(name: str) -> Callable[..., Any]:
    """Import the function named by ``name`` (see :func:`parse_user_task_name`).

    A file path is read relative to the current directory; a dotted module is imported with the
    current directory on ``sys.path`` (as ``python -m`` does)."""
    where, function, is_file = parse_user_task_name(name)
    if is_file:
        path = Path(where).expanduser()
        if not path.is_file():
            raise UserTaskError(f"task {name!r}: file {where!r} does not exist (looked in {os.getcwd()})")
        path = path.resolve()
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module_name = f"gradsparse_user_task_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise UserTaskError(f"task {name!r}: {where!r} cannot be loaded as a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # classes defined there can be pickled and deep-copied
            try:
                spec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - the user's code: any failure is reported
                del sys.modules[module_name]
                raise UserTaskError(f"task {name!r}: importing {where} failed{_where_raised(exc, str(path))}: "
                                    f"{_one_line(exc)}") from None
        label = where
    else:
        added = os.getcwd() not in sys.path and "" not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            missing = exc.name or where
            raise UserTaskError(f"task {name!r}: no module named {missing!r} (is it installed, or on PYTHONPATH / "
                                f"in the current directory {os.getcwd()}?)") from None
        except Exception as exc:  # noqa: BLE001
            raise UserTaskError(f"task {name!r}: importing module {where} failed{_where_raised(exc, None)}: "
                                f"{_one_line(exc)}") from None
        finally:
            if added:
                sys.path.remove(os.getcwd())
        label = f"module {where}"
    if not hasattr(module, function):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise UserTaskError(f"task {name!r}: {label} has no function {function!r} "
                            f"(it defines: {', '.join(defined) or 'no public functions'})")
    fn = getattr(module, function)
    if not callable(fn):
        raise UserTaskError(f"task {name!r}: {function!r} in {label} is a {type(fn).__name__}, not a function")
    return fn


@contextmanager
def _seeded(seed: int):
    """torch's, NumPy's and Python's global generators seeded with ``seed``, restored after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _call(name: str, fn: Callable, seed: int, options: dict) -> Any:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    kwargs = dict(options)
    if sig is not None:
        params = sig.parameters
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not var_kw:
            unknown = sorted(set(options) - set(named))
            if unknown:
                allowed = [n for n in named if n != "seed"]
                raise UserTaskError(f"task {name!r} has no option(s) {unknown}; its function takes: "
                                    f"{', '.join(allowed) or 'no options'}")
        required = [n for n, p in params.items() if p.default is p.empty and n not in options and n != "seed"
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            raise UserTaskError(f"task {name!r}: its function needs option(s) {required}: give them under task.options")
        if var_kw or "seed" in named:
            kwargs["seed"] = seed
    else:
        kwargs["seed"] = seed
    root = getattr(inspect.getmodule(fn), "__file__", None)
    try:
        with _seeded(seed):
            return fn(**kwargs)
    except UserTaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise UserTaskError(f"task {name!r} raised{_where_raised(exc, os.path.abspath(root) if root else None)}: "
                            f"{_one_line(exc)}") from None


def make_user_task(name: str, seed: int = 0, **options: Any) -> Task:
    """Import the task function named ``name``, call it with ``seed`` and ``options`` and turn
    what it returns into a checked :class:`Task` (see the module docstring)."""
    fn = load_user_function(name)
    returned = _call(name, fn, seed, options)
    if isinstance(returned, Task):
        task = returned
    elif isinstance(returned, dict):
        task = task_from(name, **_checked_keys(name, returned))
    else:
        raise UserTaskError(f"task {name!r} returned {type(returned).__name__}; expected a dict with keys "
                            f"{', '.join(RETURN_KEYS)} (model or params, train, ...) or a gradsparse.tasks.Task")
    probe(task, name)
    return task


def _checked_keys(name: str, d: dict) -> dict:
    unknown = [k for k in d if k not in RETURN_KEYS]
    if unknown:
        raise UserTaskError(f"task {name!r} returned unknown key {unknown[0]!r}; allowed keys: {', '.join(RETURN_KEYS)}")
    return d


def _tensor(name: str, what: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserTaskError(f"task {name!r}: {what} is a {type(value).__name__}, not a tensor or array "
                            f"({_one_line(exc)})") from None


def _data(name: str, key: str, value: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors/arrays, a TensorDataset of two tensors, or a Dataset of pairs."""
    if isinstance(value, torch.utils.data.TensorDataset):
        if len(value.tensors) != 2:
            raise UserTaskError(f"task {name!r}: {key} is a TensorDataset of {len(value.tensors)} tensors; "
                                "expected two (inputs, targets)")
        x, y = value.tensors
    elif isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise UserTaskError(f"task {name!r}: {key} is a {type(value).__name__} of {len(value)} items; "
                                "expected (inputs, targets)")
        x, y = _tensor(name, f"{key} inputs", value[0]), _tensor(name, f"{key} targets", value[1])
    elif hasattr(value, "__getitem__") and hasattr(value, "__len__"):
        n = len(value)
        if n == 0:
            raise UserTaskError(f"task {name!r}: {key} is an empty Dataset")
        xs, ys = [], []
        for i in range(n):
            try:
                item = value[i]
            except Exception as exc:  # noqa: BLE001
                raise UserTaskError(f"task {name!r}: {key}[{i}] failed: {_one_line(exc)}") from None
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise UserTaskError(f"task {name!r}: {key}[{i}] is {type(item).__name__}; a Dataset must give "
                                    "(input, target) pairs")
            xs.append(_tensor(name, f"{key}[{i}] input", item[0]))
            ys.append(_tensor(name, f"{key}[{i}] target", item[1]))
        try:
            x, y = torch.stack(xs), torch.stack(ys)
        except RuntimeError as exc:
            raise UserTaskError(f"task {name!r}: the items of {key} do not stack into tensors "
                                f"(different shapes?): {_one_line(exc)}") from None
    else:
        raise UserTaskError(f"task {name!r}: {key} is a {type(value).__name__}; expected (inputs, targets) "
                            "tensors or a torch Dataset of (input, target) pairs")
    x, y = _tensor(name, f"{key} inputs", x), _tensor(name, f"{key} targets", y)
    if x.dim() == 0 or y.dim() == 0:
        raise UserTaskError(f"task {name!r}: {key} inputs and targets need a first (sample) dimension")
    if x.shape[0] != y.shape[0]:
        raise UserTaskError(f"task {name!r}: {key} has {x.shape[0]} inputs but {y.shape[0]} targets")
    if x.shape[0] == 0:
        raise UserTaskError(f"task {name!r}: {key} holds no samples")
    return x.contiguous(), y.contiguous()


def _forbidden_layers(module: nn.Module) -> list[str]:
    bad = []
    for mname, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            bad.append(f"{mname or 'the model'} ({type(m).__name__}: its randomness cannot be vmapped)")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            bad.append(f"{mname or 'the model'} ({type(m).__name__} with running statistics: use "
                       "track_running_stats=False, or GroupNorm / LayerNorm)")
    return bad


def task_from(name: str, *, model: nn.Module | None = None, params: dict | None = None, loss: Callable | None = None,
              predict: Callable | None = None, train: Any = None, test: Any = None, f_star: float | None = None,
              info: dict | None = None) -> Task:
    """A :class:`Task` from a model (``nn.Module``) or a parameter dict with a functional loss,
    and data; see the module docstring. Raises :class:`UserTaskError` naming what is wrong."""
    if (model is None) == (params is None):
        raise UserTaskError(f"task {name!r}: give exactly one of 'model' (an nn.Module) or 'params' "
                            f"(a dict name -> tensor, with a functional 'loss')"
                            + ("" if model is None else "; both were given"))
    if train is None:
        raise UserTaskError(f"task {name!r}: 'train' is missing: give (inputs, targets) tensors or a Dataset")
    train_x, train_y = _data(name, "train", train)
    test_x = test_y = None
    if test is not None:
        test_x, test_y = _data(name, "test", test)
    if f_star is not None:
        if isinstance(f_star, bool) or not isinstance(f_star, (int, float)) or not math.isfinite(float(f_star)):
            raise UserTaskError(f"task {name!r}: f_star must be a finite number, got {f_star!r}")
        f_star = float(f_star)
    if info is not None and not isinstance(info, dict):
        raise UserTaskError(f"task {name!r}: info must be a dict, got {type(info).__name__}")
    if loss is not None and not callable(loss):
        raise UserTaskError(f"task {name!r}: loss is a {type(loss).__name__}, not a function")
    if predict is not None and not callable(predict):
        raise UserTaskError(f"task {name!r}: predict is a {type(predict).__name__}, not a function")
    labels = not train_y.is_floating_point() and not train_y.is_complex() and train_y.dtype != torch.bool
    full_info: dict = {"user_task": name}
    if model is not None:
        if not isinstance(model, nn.Module):
            raise UserTaskError(f"task {name!r}: model is a {type(model).__name__}, not a torch.nn.Module")
        if predict is not None:
            raise UserTaskError(f"task {name!r}: 'predict' belongs to the params form; a model's output is its prediction")
        bad = _forbidden_layers(model)
        if bad:
            raise UserTaskError(f"task {name!r}: the simulator runs the model in eval mode and cannot train "
                                f"layer {bad[0]}; remove it")
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        _check_params(name, initial)
        module = model.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        criterion = loss if loss is not None else F.cross_entropy

        def loss_fn(p, x, y):
            return criterion(functional_call(module, p, (x,)), y)

        predict_fn = (lambda p, x: functional_call(module, p, (x,))) if labels else None
        full_info.update(model=type(model).__name__)
    else:
        if not isinstance(params, dict):
            raise UserTaskError(f"task {name!r}: params is a {type(params).__name__}; expected a dict name -> tensor")
        if loss is None:
            raise UserTaskError(f"task {name!r}: the params form needs 'loss': fn(params, x, y) -> mean loss")
        initial = {}
        for n, p in params.items():
            if not isinstance(n, str) or not isinstance(p, torch.Tensor):
                raise UserTaskError(f"task {name!r}: params must map names (str) to tensors; "
                                    f"{n!r} -> {type(p).__name__}")
            initial[n] = p.detach().clone()
        _check_params(name, initial)
        module, loss_fn, predict_fn = None, loss, predict

    def init_params(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The model the task function built (fixed by the run's seed; the generator is not used)."""
        return {n: p.clone() for n, p in initial.items()}

    full_info.update(d=sum(p.numel() for p in initial.values()), input_shape=tuple(train_x.shape[1:]),
                     param_shapes={n: tuple(p.shape) for n, p in initial.items()})
    full_info.update(info or {})
    return Task(name=name, init_params=init_params, loss=loss_fn, train_x=train_x, train_y=train_y,
                test_x=test_x, test_y=test_y, predict=predict_fn, f_star=f_star, info=full_info, module=module)


def _check_params(name: str, params: dict[str, torch.Tensor]) -> None:
    if not params:
        raise UserTaskError(f"task {name!r}: the model has no parameters to train")
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
        shown = ", ".join(f"{n}: {str(p.dtype).replace('torch.', '')}" for n, p in list(params.items())[:4])
        raise UserTaskError(f"task {name!r}: the parameters must share one dtype, float32 or float64 ({shown})")
    empty = [n for n, p in params.items() if p.numel() == 0]
    if empty:
        raise UserTaskError(f"task {name!r}: parameter {empty[0]!r} has no entries")


def probe(task: Task, name: str) -> None:
    """The loss on two training rows is a finite-shaped scalar and differentiable per worker
    (``vmap(grad(loss))`` over a stack of two one-row batches, as the simulator calls it); the
    prediction on two test rows is one row of scores per sample."""
    params = task.init_params(torch.Generator().manual_seed(0))
    rows = min(2, task.n_train)
    x, y = task.train_x[:rows], task.train_y[:rows]
    try:
        value = task.loss(params, x, y)
    except Exception as exc:  # noqa: BLE001
        raise UserTaskError(f"task {name!r}: the loss on {rows} training rows failed: {_one_line(exc)}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise UserTaskError(f"task {name!r}: the loss must return a floating scalar (the mean over the batch), "
                            f"got {what}")
    try:
        g = vmap(grad(task.loss), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
    except Exception as exc:  # noqa: BLE001
        raise UserTaskError(f"task {name!r}: the loss cannot be differentiated per worker with "
                            f"torch.func.vmap(grad(loss)): {_one_line(exc)}; it must be pure (no in-place "
                            "changes of parameters, no .item(), no Python branches on data values)") from None
    for n, p in params.items():
        if n not in g or tuple(g[n].shape) != (rows, *p.shape):
            raise UserTaskError(f"task {name!r}: the loss does not depend on the parameters as given (no gradient "
                                f"for {n!r})")
    if task.predict is not None:
        where = task.test_x if task.test_x is not None else task.train_x
        try:
            scores = task.predict(params, where[:rows])
        except Exception as exc:  # noqa: BLE001
            raise UserTaskError(f"task {name!r}: the prediction on {rows} rows failed: {_one_line(exc)}") from None
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != rows:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise UserTaskError(f"task {name!r}: with integer targets the model must output one row of class scores "
                                f"per sample ([{rows}, classes] here), got {shape}")
