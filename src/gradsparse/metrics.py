"""Diagnostics of ALGORITHMS.md §7, as metric columns.

Column names (one name per idea, used in configs, CSVs, plots and docs):

===================  =========================================================================
``step``             steps completed
``epoch``            passes over the training set (all workers' samples together)
``loss``             full training objective f(w) (regularisers included)
``test_accuracy``    accuracy on the held-out set (training set if the task has none)
``suboptimality``    f(w) - f* (tasks with a known optimum)
``grad_norm_sq``     ||grad f(w)||^2 on the full training set
``error_norm``       ||sum_q p_q e_q||, the norm of the (weighted) mean worker memory
``total_error``      sum over all steps so far of ||sum_q p_q e_q||^2 (paper 002)
``density``          mean_q k_q / d of this step's uplink messages
``avg_density``      (1/T) sum_t density_t over all steps so far
``uplink_bytes``     cumulative bytes sent by workers (exact wire sizes)
``downlink_bytes``   cumulative bytes received by workers (see ``topology``)
``xi``               paper 000 Assumption 1: ||C(sum p a) - sum p C(a)|| / ||alpha sum p g||
``rho_hat``          paper 003: uplink/all-to-all as ``xi``; bidirectional/downlink-only
                     ||C_down(delta + sum p a) - C_down(delta + sum p C(a))|| / ||alpha sum p g||
``gamma_hat_up``     1 - max_q ||C(a_q) - a_q|| / ||a_q||
``gamma_hat_down``   1 - ||C_down(G) - G|| / ||G|| (topologies with downlink compression)
``aggregate_density`` nnz(sum_q p_q C(a_q)) / d, the server aggregate's fraction of nonzeros
===================  =========================================================================

``a_q`` is the vector the worker's compressor saw (alpha g + e for ``ef``; for ``memory``
feedback, v = u + g, and then ``alpha`` is applied to the sums so every term is on the
update's scale).
"""

from __future__ import annotations

import math

import torch

METRICS = (
    "step",
    "epoch",
    "loss",
    "test_accuracy",
    "suboptimality",
    "grad_norm_sq",
    "error_norm",
    "total_error",
    "density",
    "avg_density",
    "uplink_bytes",
    "downlink_bytes",
    "xi",
    "rho_hat",
    "gamma_hat_up",
    "gamma_hat_down",
    "aggregate_density",
)

#: metrics that need the model evaluated on data (computed only at recording steps)
EVAL_METRICS = ("loss", "test_accuracy", "suboptimality", "grad_norm_sq")
#: metrics that describe one step (empty in the row of step 0)
STEP_METRICS = ("density", "xi", "rho_hat", "gamma_hat_up", "gamma_hat_down", "aggregate_density")
DEFAULT_METRICS = (
    "step", "epoch", "loss", "test_accuracy", "suboptimality", "error_norm", "total_error",
    "density", "avg_density", "uplink_bytes", "downlink_bytes",
)


def check_metrics(names) -> None:
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; allowed: {', '.join(METRICS)}")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(den)
    return float(num) / d if d > 0 else math.nan


def eval_metrics(sim, names) -> dict:
    """Metrics that evaluate the current model of ``sim`` on data."""
    out: dict = {}
    if "loss" in names or "suboptimality" in names:
        loss = sim.full_loss()
        if "loss" in names:
            out["loss"] = loss
        if "suboptimality" in names:
            out["suboptimality"] = loss - sim.task.f_star if sim.task.f_star is not None else math.nan
    if "grad_norm_sq" in names:
        out["grad_norm_sq"] = float(sim.full_gradient().square().sum())
    if "test_accuracy" in names:
        acc = sim.test_accuracy()
        out["test_accuracy"] = math.nan if acc is None else acc
    return out


def cumulative_metrics(sim, names) -> dict:
    out: dict = {"step": sim.t, "epoch": sim.epoch}
    if "error_norm" in names:
        e = sim.wstate.get("e")
        out["error_norm"] = float((sim.weights @ e).norm()) if e is not None else 0.0
    if "total_error" in names:
        out["total_error"] = sim.total_error
    if "avg_density" in names:
        out["avg_density"] = sim.density_sum / max(sim.t, 1)
    if "uplink_bytes" in names:
        out["uplink_bytes"] = sim.uplink_bytes
    if "downlink_bytes" in names:
        out["downlink_bytes"] = sim.downlink_bytes
    return {k: v for k, v in out.items() if k in names or k in ("step", "epoch")}


def step_metrics(sim, rec, names) -> dict:
    """Per-step diagnostics from a :class:`~gradsparse.engines.sync_sim.StepRecord`."""
    out: dict = {}
    alg, p = sim.alg, sim.weights
    scale = 1.0 if alg.lr_inside else rec.lr
    if "density" in names:
        out["density"] = float(rec.nnz.float().mean()) / sim.d
    if {"xi", "rho_hat", "gamma_hat_up"} & set(names):
        a, s = rec.worker.accumulated, rec.worker.sent
    if {"xi", "rho_hat"} & set(names):
        denom = (rec.lr * rec.weighted_grad(p)).norm()
        agg_a = scale * (p @ a)
        agg_s = scale * (p @ s)
        c_of_mean = alg.compressor(agg_a[None], rec.step, torch.tensor([-2]))[0][0]
        xi = _ratio((c_of_mean - agg_s).norm(), denom)
        if "xi" in names:
            out["xi"] = xi
        if "rho_hat" in names:
            if alg.down_compressor is None:
                out["rho_hat"] = xi
            else:
                delta = rec.server_state_before.get("delta")
                cd = alg.down_compressor
                lhs = cd((delta + agg_a)[None], rec.step, torch.tensor([-1]))[0][0]
                rhs = cd((delta + agg_s)[None], rec.step, torch.tensor([-1]))[0][0]
                out["rho_hat"] = _ratio((lhs - rhs).norm(), denom)
    if "gamma_hat_up" in names:
        num = (s - a).norm(dim=1)
        den = a.norm(dim=1)
        r = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(den))
        out["gamma_hat_up"] = 1.0 - float(r.max())
    if "gamma_hat_down" in names:
        if rec.server.down_support is None:
            out["gamma_hat_down"] = math.nan
        else:
            G = rec.server.pre_downlink
            out["gamma_hat_down"] = 1.0 - _ratio((rec.server.update - G).norm(), G.norm())
    if "aggregate_density" in names:
        out["aggregate_density"] = int((rec.server.aggregate != 0).sum()) / sim.d
    return out


def residual_ratio_curve(G: torch.Tensor, ks) -> list[tuple[int, float, float]]:
    """Paper 000 Fig. 2: ||G - TopK_k(G)|| / ||G|| for every k in ``ks``, from one sort.

    Returns [(k, ratio, uniform worst case sqrt(1 - k/d))].
    """
    G = G.reshape(-1).double()
    d = G.numel()
    sq = torch.sort(G.square(), descending=True).values
    total = float(sq.sum())
    kept = torch.cumsum(sq, 0)
    out = []
    for k in ks:
        k = int(k)
        if not 0 <= k <= d:
            raise ValueError(f"residual ratio k = {k} must be in [0, d = {d}]")
        rest = total - (float(kept[k - 1]) if k > 0 else 0.0)
        ratio = math.sqrt(max(rest, 0.0) / total) if total > 0 else math.nan
        out.append((k, ratio, math.sqrt(1.0 - k / d)))
    return out
