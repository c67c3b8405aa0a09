"""Per-worker gradients of an ``nn.Module`` built from Linear layers, without ``vmap``.

In synchronous SGD every worker evaluates the same model, so the forward pass of all N
workers' mini-batches is one ordinary forward over the ``N * b`` stacked samples. For a Linear
layer ``z = a W^T + c`` the gradient of worker q's loss is a sum over q's own samples only:

    dL_q/dW = sum_{s in q} dz_s^T a_s          dL_q/dc = sum_{s in q} dz_s

so one backward pass to the layer outputs ``dz`` (of the sum of the workers' mean losses)
followed by one batched matmul per layer, ``[N, out, b] @ [N, b, in]``, gives all N gradients.
This is the per-example-gradient trick of DP-SGD libraries, applied per worker instead of per
sample, and it skips the bookkeeping of ``vmap(grad)`` (timings of both paths in
``benchmarks/bench_simulator.py``). The gradients can stay factored: :class:`GradientFactors`
writes ``e + lr * G`` into the error-feedback memory in one pass, without an [N, d] gradient.

It is exact under two conditions:

* every parameter is the weight or bias of an ``nn.Linear`` that is called once per forward
  (:func:`grouped_gradients_supported`, and a check at every call);
* the loss is the mean of per-sample losses with no interaction between samples (no batch
  norm), so the sum over workers of their mean losses is ``N * loss(all N b samples)``. The
  simulator checks this one by comparing with ``vmap`` on a probe batch when it starts, and
  falls back to ``vmap`` if they differ (see :class:`~gradsparse.engines.sync_sim.SyncSimulator`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..tasks import Task


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def grouped_gradients_supported(task: Task, names: list[str]) -> bool:
    """True when ``task`` exposes its module and every parameter belongs to a Linear layer."""
    module = getattr(task, "module", None)
    if module is None:
        return False
    owned = set()
    for lname, lin in linear_layers(module).items():
        for pname, _ in lin.named_parameters(recurse=False):
            owned.add(f"{lname}.{pname}" if lname else pname)
    return set(names) == owned and len(names) > 0


class GroupedLinearGradients:
    """Callable ``(params, x [N, b, ...], y [N, b], out [N, d]) -> out`` filling ``out`` with
    the N per-worker gradients of ``task.loss`` (parameter blocks laid out in ``names`` order)."""

    def __init__(self, task: Task, names: list[str], sizes: list[int]) -> None:
        if not grouped_gradients_supported(task, names):
            raise ValueError(f"task {task.name!r} is not a module of Linear layers only")
        self.task = task
        self.module = task.module
        self._scratch: torch.Tensor | None = None  # reused [N * out * in] matmul buffer
        self.layers = linear_layers(self.module)
        offsets, off = {}, 0
        for n, s in zip(names, sizes):
            offsets[n] = (off, s)
            off += s
        # per layer: (weight slot, bias slot or None)
        self.slots = {}
        for lname, lin in self.layers.items():
            pre = f"{lname}." if lname else ""
            w_slot = offsets[pre + "weight"]
            b_slot = offsets.get(pre + "bias") if lin.bias is not None else None
            self.slots[lin] = (w_slot, b_slot)

    def factors(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> "GradientFactors":
        """Forward and backward over the stacked batches x [N, b, ...], y [N, b]; returns the
        per-layer factors (dL/dz, layer input) from which the N gradients are formed."""
        n, b = int(y.shape[0]), int(y.shape[1])
        xs = x.reshape(n * b, *x.shape[2:])
        ys = y.reshape(n * b, *y.shape[2:])
        records: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []

        def hook(mod, inputs, output):
            # parameters and data need no gradient, so the first layer's output is a leaf: make it
            # require grad so the graph starts there (later outputs already depend on it)
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            records.append((mod, inputs[0].detach(), output))
            return output

        handles = [m.register_forward_hook(hook) for m in self.layers.values()]
        try:
            with torch.enable_grad():
                detached = {k: v.detach() for k, v in params.items()}
                total = self.task.loss(detached, xs, ys) * n  # = sum_q mean loss of worker q
                if len(records) != len(self.layers) or len({id(r[0]) for r in records}) != len(records):
                    raise RuntimeError("grouped gradients need every Linear layer called exactly once")
                douts = torch.autograd.grad(total, [r[2] for r in records])
        finally:
            for h in handles:
                h.remove()
        layers = []
        for (mod, a, _), dz in zip(records, douts):
            layers.append(
                (
                    self.slots[mod],
                    dz.reshape(n, -1, mod.out_features).contiguous(),
                    a.reshape(n, -1, mod.in_features).contiguous(),
                )
            )
        return GradientFactors(n, layers, self.buffer)

    def __call__(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        return self.factors(params, x, y).write_into(out)

    def buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A scratch slice of ``numel`` entries, reused from step to step (grown when needed)."""
        if self._scratch is None or self._scratch.numel() < numel or self._scratch.dtype != dtype:
            self._scratch = torch.empty(numel, dtype=dtype)
        return self._scratch[:numel]


def _put(view: torch.Tensor, value: torch.Tensor, alpha: float, accumulate: bool) -> None:
    """view += alpha * value, or view = alpha * value."""
    if accumulate:
        view.add_(value, alpha=alpha)
    elif alpha == 1.0:
        view.copy_(value)
    else:
        torch.mul(value, alpha, out=view)


class GradientFactors:
    """The N per-worker gradients in factored form: per Linear layer, dL/dz [N, b, out] and the
    layer input [N, b, in] (a few MB where the dense gradients take N * d floats)."""

    def __init__(self, n: int, layers: list, buffer) -> None:
        self.n = n
        self.layers = layers  # [((w_off, w_size), (b_off, b_size) | None, dz, a), ...]
        self.buffer = buffer  # (numel, dtype) -> reusable scratch tensor

    def write_into(self, out: torch.Tensor, alpha: float = 1.0, accumulate: bool = False) -> torch.Tensor:
        """``out = alpha * G`` (or ``out += alpha * G`` when ``accumulate``) for the [N, d] matrix
        G of per-worker gradients: one pass over ``out``, no [N, d] temporary."""
        for ((w_off, w_size), b_slot), dz, a in self.layers:
            view = out[:, w_off : w_off + w_size]
            # batched matmul into a reused contiguous buffer, then one strided add/copy into the
            # [N, d] rows (a batched matmul straight into the strided slice loops per worker)
            tmp = self.buffer(w_size * self.n, dz.dtype).view(self.n, dz.shape[2], a.shape[2])
            torch.bmm(dz.transpose(1, 2), a, out=tmp)
            _put(view, tmp.view(self.n, w_size), alpha, accumulate)
            if b_slot is not None:
                b_off, b_size = b_slot
                _put(out[:, b_off : b_off + b_size], dz.sum(dim=1), alpha, accumulate)
        return out

    def dense(self, d: int, dtype: torch.dtype) -> torch.Tensor:
        return self.write_into(torch.empty(self.n, d, dtype=dtype))

    def weighted_sum(self, p: torch.Tensor, d: int) -> torch.Tensor:
        """sum_q p_q g_q as a [d] vector (one matmul per layer)."""
        dtype = self.layers[0][1].dtype
        out = torch.empty(d, dtype=dtype)
        pw = p.to(dtype)[:, None, None]
        for ((w_off, w_size), b_slot), dz, a in self.layers:
            dzp = (dz * pw).reshape(-1, dz.shape[2])
            out[w_off : w_off + w_size] = (dzp.T @ a.reshape(-1, a.shape[2])).reshape(-1)
            if b_slot is not None:
                b_off, b_size = b_slot
                out[b_off : b_off + b_size] = dzp.sum(0)
        return out
