"""Diagnostics of ALGORITHMS.md §7, as metric columns.

Column names (one name per idea, used in configs, CSVs, plots and docs):

===========================  ==================================================================
``step``                     steps completed
``epoch``                    passes over the training set (all workers' samples together)
``loss``                     full training objective f(w) (regularisers included)
``test_accuracy``            accuracy on the held-out set (training set if the task has none)
``suboptimality``            f(w) - f* (tasks with a known optimum)
``grad_norm_sq``             ||grad f(w)||^2 on the full training set
``mean_memory_norm``         ||sum_q p_q e_q||, the norm of the (weighted) mean worker memory
``worker_error_sq``          (1/N) sum_q ||e_q||^2 at this step, the per-worker average
``total_error``              sum over all steps so far of ``worker_error_sq`` (paper 002's total
                             error; a different quantity from the mean memory's norm)
``density``                  mean_q k_q / d of this step's uplink messages
``avg_density``              (1/T) sum_t density_t over all steps so far
``uplink_bytes``             cumulative bytes sent by workers (exact wire sizes)
``downlink_bytes``           cumulative bytes received by workers (see :mod:`gradsparse.topology`)
``xi``                       paper 000 Assumption 1: ||C(sum p a) - sum p C(a)|| / ||alpha sum p g||
``rho_hat``                  paper 003: ``xi`` for all-to-all / uplink-only; with a compressed
                             downlink ||C_down(delta + sum p a) - C_down(delta + sum p C(a))|| /
                             ||alpha sum p g||
``rho_hat_max``              maximum of ``rho_hat`` over every step since the previous row
``rho_hat_numerator``        the numerator of ``rho_hat`` (its norm of a difference of compressions)
``rho_hat_denominator``      its denominator ||alpha sum p g|| (paper 003 plots the two apart)
``downlink_memory_norm``     ||delta||, the server's downlink memory before this step's aggregate
                             (0 without a compressed downlink)
``gamma_hat_up``             1 - ``compression_ratio_up``
``compression_ratio_up``     max_q ||C(a_q) - a_q|| / ||a_q|| (what paper 003 plots; 1 - gamma^)
``compression_ratio_up_max`` maximum of ``compression_ratio_up`` over every step since the last row
``gamma_hat_down``           1 - ``compression_ratio_down``
``compression_ratio_down``   ||C_down(G) - G|| / ||G|| (topologies with a compressed downlink)
``aggregate_density``        nnz(sum_q p_q C(a_q)) / d, the server aggregate's fraction of nonzeros
``virtual_time``             (asynchronous engine) the virtual clock at the row's last update
``staleness_mean``           (asynchronous) mean staleness t - tau of the updates since the last row
``staleness_max``            (asynchronous) their maximum
``update_cosine``            (asynchronous, costs a gradient per update) mean over those updates of
                             the cosine between the applied update and a fresh gradient at the
                             server's model (paper 001)
===========================  ==================================================================

``a_q`` is the vector the worker's compressor saw (alpha g + e for ``ef``; p for ``ef-scaled``;
v = u + g for ``memory``) and ``g`` what the worker fed to error feedback (its gradient with
weight decay and proximal term, or its momentum direction) — the same g on both sides of every
ratio. C is applied to ``sum p a`` exactly as the workers apply it (for ``ef-scaled``,
gamma C(x / gamma), so a hard-threshold's lambda acts on the scale the workers used); for
``memory`` feedback every term is then multiplied by eta to be on the update's scale.

The residual ratio ||G - TopK_k(G)|| / ||G|| of paper 000 (Fig. 2) is measured on the workers'
gradient G = sum_q p_q g_q (:func:`residual_ratio_curve`).
"""

from __future__ import annotations

import math

import torch

from .compressors import CompressionContext
from .wire import sendable

METRICS = (
    "step",
    "epoch",
    "loss",
    "test_accuracy",
    "suboptimality",
    "grad_norm_sq",
    "mean_memory_norm",
    "worker_error_sq",
    "total_error",
    "density",
    "avg_density",
    "uplink_bytes",
    "downlink_bytes",
    "skipped_messages",  # cumulative: worker messages dropped by on_nonfinite: skip
    "xi",
    "rho_hat",
    "rho_hat_max",
    "rho_hat_numerator",
    "rho_hat_denominator",
    "downlink_memory_norm",
    "gamma_hat_up",
    "compression_ratio_up",
    "compression_ratio_up_max",
    "gamma_hat_down",
    "compression_ratio_down",
    "aggregate_density",
    "virtual_time",
    "staleness_mean",
    "staleness_max",
    "update_cosine",
)

#: metrics only an asynchronous engine records (per row, over the server updates since the last row)
ASYNC_METRICS = ("virtual_time", "staleness_mean", "staleness_max", "update_cosine")

#: maxima over every step since the last recorded row: metric -> the per-step metric it tracks
RUNNING_MAXIMA = {"rho_hat_max": "rho_hat", "compression_ratio_up_max": "compression_ratio_up"}
DEFAULT_METRICS = (
    "step", "epoch", "loss", "test_accuracy", "suboptimality", "mean_memory_norm", "total_error",
    "density", "avg_density", "uplink_bytes", "downlink_bytes",
)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(den)
    return float(num) / d if d > 0 else math.nan


def eval_metrics(engine, names) -> dict:
    """Metrics that evaluate the current model of ``engine`` on data."""
    out: dict = {}
    if "loss" in names or "suboptimality" in names:
        loss = engine.full_loss()
        if "loss" in names:
            out["loss"] = loss
        if "suboptimality" in names:
            out["suboptimality"] = loss - engine.task.f_star if engine.task.f_star is not None else math.nan
    if "grad_norm_sq" in names:
        out["grad_norm_sq"] = float(engine.full_gradient().double().square().sum())
    if "test_accuracy" in names:
        acc = engine.test_accuracy()
        out["test_accuracy"] = math.nan if acc is None else acc
    return out


def cumulative_metrics(engine, names) -> dict:
    out: dict = {"step": engine.t, "epoch": engine.epoch}
    memory = engine.worker_state.memory
    if "mean_memory_norm" in names:
        out["mean_memory_norm"] = float((engine.worker_weights @ memory.flat).norm()) if memory is not None else 0.0
    if "worker_error_sq" in names:
        out["worker_error_sq"] = float(memory.flat.double().square().sum()) / engine.n_workers if memory is not None else 0.0
    if "total_error" in names:
        out["total_error"] = engine.total_error
    if "avg_density" in names:
        out["avg_density"] = engine.density_sum / max(engine.t, 1)
    if "uplink_bytes" in names:
        out["uplink_bytes"] = engine.ledger.uplink_bytes
    if "downlink_bytes" in names:
        out["downlink_bytes"] = engine.ledger.downlink_bytes
    return {k: v for k, v in out.items() if k in names or k in ("step", "epoch")}


def step_metrics(engine, rec, names) -> dict:
    """Per-step diagnostics from a :class:`~gradsparse.engines.synchronous.StepRecord`."""
    names = set(names)
    out: dict = {}
    alg, p = engine.alg, engine.weights
    scale = 1.0 if alg.lr_inside else rec.lr  # from the accumulated vectors' scale to the update's
    diagnostic = CompressionContext(rec.step, None, "diagnostic")
    if "density" in names:
        out["density"] = float(rec.nnz.double().mean()) / engine.d
    if names & {"xi", "rho_hat", "rho_hat_numerator", "rho_hat_denominator", "gamma_hat_up", "compression_ratio_up"}:
        a = rec.accumulated()
        s = rec.worker.message.to_dense(a.dtype)
    if names & {"xi", "rho_hat", "rho_hat_numerator", "rho_hat_denominator"}:
        denom = (rec.lr * rec.weighted_feedback_input(p)).norm()
        mean_a, mean_s = p.to(a.dtype) @ a, p.to(a.dtype) @ s
        # C applied as the workers apply it, values as sent (rounded to the wire's value dtype)
        c_of_mean = sendable(alg.feedback.compress_as_worker(mean_a[None], rec.lr, alg.compressor, diagnostic),
                             alg.value_dtype).to_dense()[0]
        numerator = (scale * (c_of_mean - mean_s)).norm()
        xi = _ratio(numerator, denom)
        if "xi" in names:
            out["xi"] = xi
        if names & {"rho_hat", "rho_hat_numerator", "rho_hat_denominator"}:
            if alg.topology.compresses_downlink:
                delta = rec.server_state_before.downlink_memory.flat
                down = alg.down_compressor
                lhs = sendable(down.compress((delta + scale * mean_a)[None], diagnostic), alg.value_dtype).to_dense()[0]
                rhs = sendable(down.compress((delta + scale * mean_s)[None], diagnostic), alg.value_dtype).to_dense()[0]
                numerator = (lhs - rhs).norm()
            if "rho_hat" in names:
                out["rho_hat"] = _ratio(numerator, denom)
            if "rho_hat_numerator" in names:
                out["rho_hat_numerator"] = float(numerator)
            if "rho_hat_denominator" in names:
                out["rho_hat_denominator"] = float(denom)
    if "downlink_memory_norm" in names:
        state = getattr(rec, "server_state_before", None)
        memory = getattr(state, "downlink_memory", None) if state is not None else None
        out["downlink_memory_norm"] = float(memory.flat.norm()) if memory is not None else 0.0
    if names & {"gamma_hat_up", "compression_ratio_up"}:
        num = (s - a).norm(dim=1)
        den = a.norm(dim=1)
        r = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(den))
        ratio = float(r.max())
        if "compression_ratio_up" in names:
            out["compression_ratio_up"] = ratio
        if "gamma_hat_up" in names:
            out["gamma_hat_up"] = 1.0 - ratio
    if names & {"gamma_hat_down", "compression_ratio_down"}:
        if not alg.topology.compresses_downlink:
            ratio = math.nan
        else:
            G = rec.server.pre_downlink
            ratio = _ratio((rec.server.update - G).norm(), G.norm())
        if "compression_ratio_down" in names:
            out["compression_ratio_down"] = ratio
        if "gamma_hat_down" in names:
            out["gamma_hat_down"] = 1.0 - ratio
    if "aggregate_density" in names:
        out["aggregate_density"] = int((rec.server.aggregate != 0).sum()) / engine.d
    return out


def residual_ratio_curve(G: torch.Tensor, ks) -> list[tuple[int, float, float]]:
    """Paper 000 Fig. 2: ||G - TopK_k(G)|| / ||G|| for every k in ``ks``, from one sort.

    The residual ||G - TopK_k(G)||^2 is the sum of the d - k smallest squares, summed from the
    smallest up (no cancellation: the ratio is exact to float64 rounding even for k close to d).
    Returns [(k, ratio, uniform worst case sqrt(1 - k/d))].
    """
    G = G.reshape(-1).double()
    d = G.numel()
    ascending = torch.sort(G.square()).values
    smallest = torch.cumsum(ascending, 0)  # smallest[j] = sum of the j + 1 smallest squares
    total = float(smallest[-1]) if d else 0.0
    out = []
    for k in ks:
        k = int(k)
        if not 0 <= k <= d:
            raise ValueError(f"residual ratio k = {k} must be in [0, d = {d}]")
        rest = float(smallest[d - k - 1]) if k < d else 0.0
        ratio = math.sqrt(rest / total) if total > 0 else math.nan
        out.append((k, ratio, math.sqrt(1.0 - k / d)))
    return out
