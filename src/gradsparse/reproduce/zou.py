"""Paper 003 (Zou): bidirectional top-k on a parameter server.

zou-toy
    The thesis's toy problem: 3 workers, d = 100, F^q(w) = 1/2 ||w - c_q 1||^2 with
    c = (1, 5, 10), exact gradients, step 0.01, K = 1, 500 iterations, w_0 = 20 * 1,
    F* = 6100/9 at w = 16/3. Uplink-only, bidirectional and downlink-only top-k with memory.
    Exact gradients make the runs deterministic: one seed is enough whatever ``--seeds`` says
    (the report says so).
"""

from __future__ import annotations

import statistics

from .base import Claim, Context, Reproduction, example_config, fmt, plot_curves, verdict_of

TOY_TOPOLOGIES = {"uplink-only": "toy_uplink", "bidirectional": "toy_bidirectional",
                  "downlink-only": "toy_downlink_only"}


def _late_mean(values: list[float]) -> float:
    """Mean of the finite values over the second half of a run (after the transient)."""
    tail = values[len(values) // 2:]
    tail = [v for v in tail if v == v]
    return statistics.fmean(tail) if tail else float("nan")


def zou_toy(ctx: Context) -> list[Claim]:
    configs = {key.replace("-", "_"): example_config(name) for key, name in TOY_TOPOLOGIES.items()}
    if len(ctx.seeds) > 1:
        ctx.note(f"The toy problem uses exact gradients and no randomness: the {len(ctx.seeds)} seeds asked "
                 "for would give identical runs, so each topology is run once (seed 0).")
    res = ctx.run_many(configs)
    up, bi, down = res["uplink_only"], res["bidirectional"], res["downlink_only"]
    n_workers, k, d = 3, 1, 100
    initial = up.metrics["suboptimality"][0]

    # 1. bidirectional converges like uplink-only
    f_up, f_bi, f_down = (r.final("suboptimality") for r in (up, bi, down))
    close = f_bi <= 1.5 * f_up and f_bi <= 0.01 * initial
    claims = [Claim(
        "bidirectional-matches-uplink",
        "Top-k on both directions (with server memory) reaches the same objective as top-k on the uplink only.",
        "toy: w_0 = 20*1, 500 iterations, K = 1; thesis figure of F - F* vs iteration for the three settings",
        {"F-F* initial": initial, "F-F* uplink-only": f_up, "F-F* bidirectional": f_bi, "F-F* downlink-only": f_down},
        "holds when F-F*(bidirectional) <= 1.5 x F-F*(uplink-only) and <= 1% of the initial F-F*; does not hold "
        "when it is above 3 x uplink-only's",
        verdict_of(close, f_bi > 3 * f_up),
    )]

    # 2. the aggregate's nonzero fraction approaches N K / d, so downlink top-k saves about N
    agg = _late_mean(up.metrics["aggregate_density"])
    bound = n_workers * k / d
    saving = agg * d / k  # values the server sends per worker: uplink-only's aggregate vs bidirectional's K
    byte_saving = up.summary["downlink_bytes"] / max(bi.summary["downlink_bytes"], 1)
    claims.append(Claim(
        "aggregate-density-near-NK/d",
        "The nonzero fraction of the server's aggregate approaches N*K/d, so top-k on the downlink saves almost a "
        "factor N in downlink data.",
        f"N*K/d = {n_workers}*{k}/{d} = {bound:g}; saving close to N = {n_workers}",
        {"aggregate density (uplink-only, late mean)": agg, "N*K/d": bound,
         "downlink values uplink-only / bidirectional": saving,
         "downlink bytes uplink-only / bidirectional": byte_saving},
        "holds when the late-run mean aggregate density lies in [0.8, 1] x N*K/d (so the value saving is >= 0.8 N); "
        "does not hold when it is below 0.5 N*K/d",
        verdict_of(0.8 * bound <= agg <= bound + 1e-12, agg < 0.5 * bound),
        explanation=(f"In bytes the saving is {fmt(byte_saving)}, not {fmt(saving)}: at d = 100 a message carries "
                     "one or three values, and each frame's fixed header outweighs them (see the wire format). "
                     "The thesis counts values."),
    ))

    # 3. rho-hat (||e_t|| growth ratio diagnostic) smaller for bidirectional than uplink-only
    rho_up, rho_bi = _late_mean(up.metrics["rho_hat"]), _late_mean(bi.metrics["rho_hat"])
    claims.append(Claim(
        "rho-hat-smaller-bidirectional",
        "The diagnostic rho-hat is smaller for bidirectional than for uplink-only top-k.",
        "thesis: consistently smaller on MNIST / Fashion-MNIST (stated there for the neural networks)",
        {"rho-hat uplink-only (late mean)": rho_up, "rho-hat bidirectional (late mean)": rho_bi},
        "holds when the late-run mean rho-hat of bidirectional is below uplink-only's; does not hold when it is above",
        verdict_of(rho_bi < rho_up, rho_bi > rho_up),
        explanation="" if rho_bi < rho_up else (
            f"On the toy problem the late-run rho-hat is {fmt(rho_bi)} for bidirectional against {fmt(rho_up)} for "
            "uplink-only: the server's top-1 of an aggregate with 3 nonzeros leaves two of them in the server memory "
            "at every step, which the toy's exact gradients do not average out. The thesis states the ordering for "
            "its neural networks (zou-workers, zou-noniid)."),
    ))
    groups = {k2: [r] for k2, r in zip(TOY_TOPOLOGIES, (up, bi, down))}
    plot_curves(ctx, groups, "step", "suboptimality", "toy_suboptimality.png",
                "F - F* vs iteration on the toy problem (thesis's toy figure)", logy=True, ylabel="F(w) - F*")
    plot_curves(ctx, {k2: [r] for k2, r in zip(TOY_TOPOLOGIES, (up, bi))}, "step", "rho_hat", "toy_rho_hat.png",
                "rho-hat vs iteration, uplink-only vs bidirectional", ylabel="rho-hat")
    return claims


REPRODUCTIONS = [
    Reproduction(
        name="zou-toy",
        paper="003",
        title="Bidirectional top-k on the toy quadratic",
        run=zou_toy,
        settings={
            "small": "3 workers, d = 100, F^q = 1/2||w - c_q 1||^2, c = (1, 5, 10), exact gradients, step 0.01, K = 1, "
                     "500 iterations, w_0 = 20 (the thesis's own setting: small and full are the same)",
            "full": "same as small",
        },
        expected_runs=lambda scale, seeds: 3,
    ),
]
