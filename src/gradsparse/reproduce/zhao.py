"""Paper 004 (Zhao, Gao, Li, "On the Convergence of Memory-Based Distributed SGD"): M-DSGD, i.e.
top-k with memory (feedback ``memory``: v = u + m, s = TopK(v), u <- v - s; the step size
outside) around local momentum (``momentum: {kind: update, beta: 0.9}``: m^q <- beta m^q + g^q),
w <- w - eta_t mean_q s_q. The paper has no experiments; its theorems' settings are used.

zhao-momentum
    M-DSGD (top-k 1%) against dense momentum SGD (identity compressor, the same momentum and
    step: v = m, u = 0), 8 nodes all-to-all, batch 16:
    convex: the linear regression of paper 000 (10,000 x 1,024, noise 0.1) under the paper's
    momentum-aware schedule eta_t = eta (1/t^a - beta/(t+1)^a), a = 1/2, and a constant step;
    non-convex: an MLP (one hidden ReLU layer of 64) on 4,000 real MNIST digits (mnist5k_mlp),
    constant step. Each schedule's eta is tuned for the dense method on seed 0 over 1/2, 1, 2 x
    a default; M-DSGD runs at the same eta.
zhao-stagewise
    Stagewise learning (§6, Lemma 11, eq. 15-16) on a non-smooth problem: the ReLU MLP on
    scikit-learn's 8x8 digits, M-DSGD (top-k 1% layer-wise), S = 3 stages at eta_s = eta_0/(s+1)
    on F + (1/2 gamma)||w - w~_s||^2, gamma = 10, with T_s chosen so that eta_s T_s = 120, the
    scale the guarantee needs (eta_0 = 0.1: T_s = 1,200, 2,400, 3,600); dense stagewise momentum
    SGD beside it. The loss at each stage average w~_1 .. w~_S (w~_S, the last stage's average, is
    the algorithm's output and the run's final value) comes from summary.json "stages".
"""

from __future__ import annotations

import math

from .base import (Claim, ClaimSpec, Context, Reproduction, agreement, all_verdicts, diverged_runs, fmt, fmt_mean_std,
                   plot_curves, verdict_of)

#: per scale: steps / logging interval per task; tests shrink these
SETTINGS = {
    "small": {"linreg": {"steps": 1000, "every": 25}, "mlp": {"steps": 600, "every": 25},
              "stagewise": {"stage_steps": [1200, 2400, 3600], "every": 100}},
    "full": {"linreg": {"steps": 5000, "every": 50}, "mlp": {"steps": 3000, "every": 50},
             "stagewise": {"stage_steps": [1200, 2400, 3600, 4800], "every": 100}},
}
LINREG = {"name": "linreg", "options": {"n_samples": 10000, "n_features": 1024, "noise": 0.1}}
MLP = {"name": "mnist5k_mlp", "options": {}}
MLP_FULL = {"name": "mnist_mlp", "options": {}}
STAGE_TASK = {"name": "digits_mlp", "options": {}}
BETA = 0.9
DENSITY = 0.01
#: (task label, schedule label) -> default schedule section; eta tuned over LR_GRID x lr
SCHEDULES = {
    ("linreg", "momentum_aware"): {"kind": "momentum_aware", "lr": 0.2, "power": 0.5, "beta": BETA},
    ("linreg", "constant"): {"kind": "constant", "lr": 0.005},
    ("mlp", "constant"): {"kind": "constant", "lr": 0.01},
}
LR_GRID = (0.5, 1.0, 2.0)
STAGE_LR, STAGE_GAMMA = 0.1, 10.0
#: eta_s T_s the stagewise guarantee needs (about 120 with the constants of paper 004's Lemma 11)
STAGE_ETA_T = 120.0
STAGE_FACTOR = 1.5  # M-DSGD's loss at w~_S within 1.5 x dense stagewise's, either way

MATCH_FACTOR = {"linreg": 2.0, "mlp": 1.5}  # M-DSGD's final f - f* (linreg) / loss (MLP) vs dense, either way


def _metric_of(task_label: str) -> str:
    return "suboptimality" if task_label == "linreg" else "loss"


def _config(task: dict, *, seed: int, steps: int, every: int, schedule: dict, sparse: bool,
            names: list[str], scope: str = "entire") -> dict:
    comp = {"kind": "topk", "density": DENSITY, "scope": scope} if sparse else {"kind": "identity"}
    return {"seed": seed, "task": task, "workers": {"count": 8, "batch_size": 16},
            "algorithm": {"compressor": comp, "feedback": "memory", "momentum": {"kind": "update", "beta": BETA},
                          "topology": {"kind": "all_to_all"}},
            "schedule": schedule, "steps": steps, "plots": False, "metrics": {"every": every, "names": names}}


# ------------------------------------------------------------------------------------------------
# zhao-momentum
# ------------------------------------------------------------------------------------------------


def best_lr(finals: dict[float, float | None]) -> float:
    """The step with the smallest finite final objective (ties: the smaller step)."""
    ok = {lr: v for lr, v in finals.items() if v is not None and math.isfinite(v)}
    if not ok:
        raise RuntimeError(f"every step of the grid {sorted(finals)} diverged")
    return min(sorted(ok), key=lambda lr: ok[lr])


MATCH = ClaimSpec(
    "mdsgd-matches-dense-momentum",
    "M-DSGD (top-k 1% with memory around local momentum, beta = 0.9) converges like dense momentum SGD under the "
    "paper's schedules, on a convex and a non-convex task.",
    "paper 004: theory only (convergence rates of M-DSGD match momentum SGD's up to higher-order terms for "
    "eta_t = eta (1/t^a - beta/(t+1)^a) (convex) and constant steps (non-convex)); no experiments",
    f"per task and schedule, per seed: M-DSGD's final objective / dense's within a factor {MATCH_FACTOR['linreg']:g} "
    f"either way for f - f* (linear regression) and {MATCH_FACTOR['mlp']:g} for the training loss (MLP); holds "
    "when every seed of every setting is inside, does not hold when every seed of some setting is outside; "
    "inconclusive otherwise, and whenever a run ended worse than it started",
    ("final f - f* (linear regression) / training loss (MLP) of M-DSGD and dense momentum SGD per seed",),
    "ratios of 5 (M-DSGD far behind, as with noise in place of its gradients) and 0.2 (far ahead) -> not holds; a "
    "diverged run -> not holds",
)


def match_claim(ratios: dict[tuple[str, str], list[float]], diverged: list[str] = ()) -> Claim:
    """``ratios``: (task, schedule) -> per-seed final objective of M-DSGD / dense momentum SGD."""
    measured, verdicts, flags, farthest = {}, [], [], 1.0
    for (task, sched), r in ratios.items():
        factor = MATCH_FACTOR[task]
        measured[f"{task} {sched}: M-DSGD / dense ({_metric_of(task)})"] = fmt_mean_std(r)
        measured[f"{task} {sched}: per seed"] = r
        inside = [math.isfinite(x) and 1 / factor <= x <= factor for x in r]
        flags += inside
        verdicts.append(verdict_of(all(inside), not any(inside)))
        for x in r:
            farthest = max(farthest, (max(x, 1 / x) / factor) if math.isfinite(x) and x > 0 else math.inf)
    verdict = all_verdicts(verdicts)
    failing = [f"{t} {s}" for ((t, s), r), v in zip(ratios.items(), verdicts) if v != "holds"]
    return MATCH.judge(
        verdict, measured, diverged=diverged,
        margin=f"farthest seed at {fmt(farthest, 3)} x its setting's allowed factor (≤ 1 passes)",
        agreed=agreement(flags, "(setting, seed) pairs"),
        explanation="" if verdict == "holds" else (
            f"Outside the factor: {', '.join(failing)}. With a constant step the memory delays 99% of the "
            "coordinates by many steps, which on the linear regression raises the noise floor f - f* that the "
            "dense method reaches at the same step; see the ratios and the f - f* figures."),
    )


def _tune(ctx: Context, tasks: dict) -> dict[tuple[str, str], dict]:
    """Dense momentum SGD on seed 0 at LR_GRID x each default eta; the best schedule per setting."""
    seed, configs = ctx.seeds[0], {}
    for (tl, sl), sched in SCHEDULES.items():
        task, st = tasks[tl]
        for f in LR_GRID:
            s = {**sched, "lr": sched["lr"] * f}
            configs[_key(tl, sl, "dense", s["lr"], seed)] = _config(
                task, seed=seed, steps=st["steps"], every=st["every"], schedule=s, sparse=False, names=_names(tl))
    res = ctx.run_many(configs)
    chosen = {}
    for (tl, sl), sched in SCHEDULES.items():
        finals = {sched["lr"] * f: res[_key(tl, sl, "dense", sched["lr"] * f, seed)].final(_metric_of(tl))
                  for f in LR_GRID}
        chosen[(tl, sl)] = {**sched, "lr": best_lr(finals)}
    ctx.note("eta tuned for dense momentum SGD on seed 0 over 1/2, 1, 2 x the default: " + "; ".join(
        f"{tl} {sl}: {fmt([SCHEDULES[(tl, sl)]['lr'] * f for f in LR_GRID])} -> {fmt(s['lr'])}"
        for (tl, sl), s in chosen.items()) + ". M-DSGD runs at the same eta.")
    return chosen


def _key(tl: str, sl: str, method: str, lr: float, seed: int) -> str:
    return f"{tl}_{sl}_{method}_lr{lr:g}_s{seed}"


def _names(tl: str) -> list[str]:
    return sorted({"step", "loss", _metric_of(tl), "uplink_bytes", "density"} | ({"test_accuracy"} if tl == "mlp" else set()))


def zhao_momentum(ctx: Context) -> list[Claim]:
    s = SETTINGS[ctx.scale]
    tasks = {"linreg": (LINREG, s["linreg"]), "mlp": (MLP if ctx.small else MLP_FULL, s["mlp"])}
    chosen = _tune(ctx, tasks)
    configs = {}
    for (tl, sl), sched in chosen.items():
        task, st = tasks[tl]
        for method in ("dense", "mdsgd"):
            for seed in ctx.seeds:
                configs[_key(tl, sl, method, sched["lr"], seed)] = _config(
                    task, seed=seed, steps=st["steps"], every=st["every"], schedule=sched, sparse=method == "mdsgd",
                    names=_names(tl))
    res = ctx.run_many(configs)
    ratios, diverged = {}, []
    for (tl, sl), sched in chosen.items():
        metric = _metric_of(tl)
        runs = {m: [res[_key(tl, sl, m, sched["lr"], seed)] for seed in ctx.seeds] for m in ("dense", "mdsgd")}
        diverged += diverged_runs(runs["dense"] + runs["mdsgd"], metric)
        ratios[(tl, sl)] = [_ratio(a.final(metric), b.final(metric)) for a, b in zip(runs["mdsgd"], runs["dense"])]
        groups = {"dense momentum SGD": runs["dense"], f"M-DSGD top-k {DENSITY:.0%}": runs["mdsgd"]}
        plot_curves(ctx, groups, "step", metric, f"{tl}_{sl}_{metric}_vs_step.png",
                    f"{tl}, {sl} schedule (eta = {fmt(sched['lr'])}): {metric} vs step, M-DSGD vs dense momentum SGD",
                    logy=True)
        plot_curves(ctx, groups, "uplink_bytes", metric, f"{tl}_{sl}_{metric}_vs_bytes.png",
                    f"{tl}, {sl} schedule: {metric} vs uplink bytes sent (all workers)", logy=True, logx=True,
                    xlabel="uplink bytes (cumulative, all workers)")
    ctx.note("Dense momentum SGD is the identity compressor under the same update-compression momentum and "
             "memory feedback (v = m, nothing kept in memory): heavy ball with the step outside. Paper 004 has no "
             "experiments; the tasks are ours, steps shortened to fit the CPU budget.")
    return [match_claim(ratios, diverged)]


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b <= 0:
        return math.inf
    return a / b


# ------------------------------------------------------------------------------------------------
# zhao-stagewise
# ------------------------------------------------------------------------------------------------


def stage_losses(summary: dict) -> list[float]:
    """The loss at each stage average w~_1, ..., w~_S (summary.json "stages"; the last is the
    run's output)."""
    return [float(s["loss_at_average"]) for s in (summary.get("stages") or [])]


STAGEWISE = ClaimSpec(
    "stagewise-converges-nonsmooth",
    "Stagewise learning with M-DSGD converges on a non-smooth problem (ReLU network), like dense stagewise "
    "momentum SGD, when each stage is long enough (eta_s T_s at the guarantee's scale).",
    "paper 004 §6 (Lemma 11, eq. 15-16): for weakly convex F, stagewise M-DSGD on F + (1/2 gamma)||w - w~_s||^2 "
    "with eta_s T_s large enough (about 120 with its constants) converges; the output is the last stage "
    "average w~_S (no experiments)",
    f"(a) regime: min_s eta_s T_s >= {STAGE_ETA_T:g} (otherwise at most inconclusive, the deviation stated); (b) on "
    "every seed the loss at the stage averages w~_0 (the initial model), w~_1, ..., w~_S decreases stage over stage; "
    f"(c) on every seed M-DSGD's loss at w~_S is within a factor {STAGE_FACTOR:g} of dense stagewise's, either way. "
    "Holds when (a), (b), (c) hold; does not hold when (b) fails on every seed or (c) fails on every seed; else "
    "inconclusive, and whenever a run ended worse than it started",
    ("eta_s and T_s of the schedule", "loss at w~_s per stage and seed (stages.csv) for M-DSGD and dense"),
    "stages of the old length (eta_s T_s = 4) -> not holds; stage losses that do not decrease (a trainer "
    "that does not learn) -> does not hold; M-DSGD 3x dense's loss (memory removed) -> does not hold",
)


def stagewise_claim(per_seed: list[tuple[float, list[float]]], dense: list[tuple[float, list[float]]],
                    eta_t: list[float], diverged: list[str] = ()) -> Claim:
    """``per_seed`` / ``dense``: (initial loss, losses at w~_1 .. w~_S) of each M-DSGD / dense seed;
    ``eta_t``: eta_s T_s of each stage."""
    decreasing = [bool(st) and all(b < a for a, b in zip([l0, *st], st)) for l0, st in per_seed]
    ratios = [(st[-1] / dst[-1] if st and dst and dst[-1] > 0 else math.inf) for (_, st), (_, dst) in zip(per_seed, dense)]
    inside = [math.isfinite(r) and 1 / STAGE_FACTOR <= r <= STAGE_FACTOR for r in ratios]
    regime = bool(eta_t) and min(eta_t) >= STAGE_ETA_T
    ok = regime and all(decreasing) and all(inside)
    bad = not any(decreasing) or not any(inside)
    verdict = verdict_of(ok, bad)
    measured = {"eta_s T_s per stage": eta_t,
                "initial loss": fmt_mean_std([l0 for l0, _ in per_seed]),
                "M-DSGD loss at w~_1..w~_S (seed 0)": per_seed[0][1] if per_seed else [],
                "dense loss at w~_1..w~_S (seed 0)": dense[0][1] if dense else [],
                "M-DSGD loss at w~_S (output)": fmt_mean_std([st[-1] if st else None for _, st in per_seed]),
                "dense loss at w~_S": fmt_mean_std([st[-1] if st else None for _, st in dense]),
                "M-DSGD / dense at w~_S per seed": ratios,
                "decreasing on seeds": f"{sum(decreasing)} / {len(per_seed)}"}
    farthest = max((max(r, 1 / r) for r in ratios if math.isfinite(r) and r > 0), default=math.inf)
    explanation = ""
    if not regime:
        explanation = (f"The stages are shorter than the guarantee needs: min eta_s T_s = {min(eta_t) if eta_t else 0:g} "
                       f"< {STAGE_ETA_T:g}, so the run is outside the theorem's regime and cannot confirm it.")
    elif verdict != "holds":
        explanation = "Some seed's stage averages did not decrease or M-DSGD ended outside the factor of dense."
    return STAGEWISE.judge(
        verdict, measured, diverged=diverged,
        margin=(f"min eta_s T_s {fmt(min(eta_t) if eta_t else 0, 3)} vs ≥ {STAGE_ETA_T:g}; farthest M-DSGD/dense "
                f"factor {fmt(farthest, 3)} vs ≤ {STAGE_FACTOR:g}"),
        agreed=agreement([d and i for d, i in zip(decreasing, inside)], "seeds decreasing and within the factor"),
        explanation=explanation)


def zhao_stagewise(ctx: Context) -> list[Claim]:
    st = SETTINGS[ctx.scale]["stagewise"]
    sched = {"kind": "stagewise", "lr": STAGE_LR, "stage_steps": st["stage_steps"], "prox_gamma": STAGE_GAMMA}
    steps = sum(st["stage_steps"])
    eta_t = [STAGE_LR / (s + 1) * T for s, T in enumerate(st["stage_steps"])]
    names = ["step", "loss", "test_accuracy", "uplink_bytes", "density"]
    configs = {f"{m}_s{seed}": _config(STAGE_TASK, seed=seed, steps=steps, every=st["every"], schedule=sched,
                                       sparse=m == "mdsgd", names=names, scope="layerwise")
               for m in ("mdsgd", "dense") for seed in ctx.seeds}
    res = ctx.run_many(configs)
    pick = lambda m: [(res[f"{m}_s{s}"].metrics["loss"][0], stage_losses(res[f"{m}_s{s}"].summary))  # noqa: E731
                      for s in ctx.seeds]
    groups = {f"M-DSGD top-k {DENSITY:.0%} stagewise": [res[f"mdsgd_s{s}"] for s in ctx.seeds],
              "dense momentum SGD stagewise": [res[f"dense_s{s}"] for s in ctx.seeds]}
    plot_curves(ctx, groups, "step", "loss", "stagewise_loss_vs_step.png",
                "Stagewise learning on the ReLU MLP (digits): training loss of the iterates vs step (stage boundaries "
                f"at {', '.join(str(sum(st['stage_steps'][:i + 1])) for i in range(len(st['stage_steps'])))})", logy=True)
    _plot_stages(ctx, {k: [stage_losses(r.summary) for r in v] for k, v in groups.items()},
                 [res[f"mdsgd_s{s}"].metrics["loss"][0] for s in ctx.seeds])
    ctx.note(f"The ReLU network makes F non-smooth (weakly convex in the paper's analysis); gamma = {STAGE_GAMMA:g} is "
             "an assumed weak-convexity scale (gamma = 1/(2c)), not measured. Stage lengths T_s = "
             f"{st['stage_steps']} at eta_s = {STAGE_LR:g}/(s+1) give eta_s T_s = {fmt(eta_t)} (the guarantee needs "
             f"about {STAGE_ETA_T:g}). Digits (8x8) instead of a larger data set to fit the CPU budget. The run's "
             "final value is the loss at w~_S, the last stage's average (the algorithm's output), not the last "
             "iterate's (summary.json 'final_last_iterate' keeps that).")
    diverged = diverged_runs([r for v in groups.values() for r in v], "loss")
    return [stagewise_claim(pick("mdsgd"), pick("dense"), eta_t, diverged)]


def _plot_stages(ctx: Context, groups: dict[str, list[list[float]]], initial: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, per_seed in groups.items():
        n = min(len(p) for p in per_seed)
        ys = np.asarray([[i0, *p[:n]] for i0, p in zip(initial, per_seed)])
        ax.errorbar(range(n + 1), ys.mean(0), yerr=ys.std(0), marker="o", capsize=3,
                    label=label + f" ({len(per_seed)} seeds)")
    ax.set_yscale("log")
    ax.set_xlabel("stage s (0: initial model)")
    ax.set_ylabel("training loss at the stage average w~_s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ctx.figure(fig, "stage_losses.png", "Loss at the stage averages w~_s (eq. 16; w~_S is the output), mean ± std "
               "over seeds")


REPRODUCTIONS = [
    Reproduction(
        name="zhao-momentum", cpu_minutes={"small": 1.7}, paper="004", title="M-DSGD with momentum converges like dense momentum SGD",
        run=zhao_momentum,
        settings={
            "small": "8 nodes, batch 16, beta 0.9, top-k 1% (entire model) with memory vs identity; linear regression "
                     "10,000 x 1,024, 1000 steps, momentum-aware eta_t = eta (1/t^0.5 - 0.9/(t+1)^0.5) and constant; "
                     "MLP on 4,000 real MNIST digits (mnist5k_mlp), 600 steps, constant; eta tuned for the dense "
                     "method on seed 0 over 1/2, 1, 2 x a default",
            "full": "as small with 5000 (linear regression) and 3000 (MLP on the 60,000 MNIST digits) steps",
        },
        full_data=("mnist",), claims=(MATCH,), seeds=3,
        # per setting: the step-size grid on seed 0, then dense and M-DSGD on every seed, dense on
        # seed 0 at the chosen step being one of the grid's runs
        expected_runs=lambda scale, seeds: len(SCHEDULES) * (len(LR_GRID) + 2 * seeds - 1)),
    Reproduction(
        name="zhao-stagewise", cpu_minutes={"small": 2.8}, paper="004", title="Stagewise M-DSGD on a non-smooth problem", run=zhao_stagewise,
        settings={
            "small": "ReLU MLP on scikit-learn's digits, 8 nodes, batch 16, M-DSGD top-k 1% layer-wise, beta 0.9; "
                     "stages of 1200, 2400, 3600 steps at eta_s = 0.1/(s+1) (eta_s T_s = 120), gamma = 10; dense "
                     "stagewise beside it; the output is w~_S",
            "full": "as small with a fourth stage of 4800 steps",
        },
        claims=(STAGEWISE,), seeds=5,
        expected_runs=lambda scale, seeds: 2 * seeds),
]
