"""The reproduction framework: verdict rules, reusable runs, reports, the suite and its index."""

from __future__ import annotations

import json
import math
import re

import pytest

from gradsparse import cli, reproduce
from gradsparse.reproduce import base, suite
from gradsparse.reproduce.base import Claim, ClaimSpec, Context, Reproduction, RunResult, example_config

INF = math.inf


# ------------------------------------------------------------------------------------------
# verdict rules
# ------------------------------------------------------------------------------------------


def test_paired_verdict_by_seed():
    assert base.paired_verdict([1, 2, 3], [2, 3, 4]) == "holds"
    assert base.paired_verdict([2, 3, 4], [1, 2, 3]) == "does not hold"
    assert base.paired_verdict([1, 3, 3], [2, 2, 4]) == "inconclusive"  # seed 1 disagrees
    assert base.paired_verdict([1, 1], [1, 1]) == "does not hold"  # a tie is not better
    assert base.paired_verdict([5, 6], [4, 5], lower_is_better=False) == "holds"
    # a run that never reached its target (+inf steps) loses, and that is a valid comparison
    assert base.paired_verdict([100, 200], [INF, INF]) == "holds"
    assert base.paired_verdict([INF, 200], [100, INF]) == "inconclusive"
    assert base.paired_verdict([INF, INF], [INF, INF]) == "inconclusive"  # neither reached the target
    assert base.paired_verdict([100, INF], [200, INF]) == "inconclusive"
    assert base.paired_verdict([1, None], [2, 3]) == "inconclusive"
    assert base.paired_verdict([1, math.nan], [2, 3]) == "inconclusive"
    with pytest.raises(ValueError, match="equal, non-empty"):
        base.paired_verdict([1, 2], [1])


def test_threshold_and_combined_verdicts():
    assert base.threshold_verdict(0.5, 1.0) == "holds"
    assert base.threshold_verdict(1.05, 1.0, margin=0.1) == "inconclusive"
    assert base.threshold_verdict(1.2, 1.0, margin=0.1) == "does not hold"
    assert base.threshold_verdict(3.0, 2.0, below=False) == "holds"
    assert base.threshold_verdict(1.0, 2.0, below=False) == "does not hold"
    assert base.threshold_verdict(math.nan, 1.0) == "inconclusive"
    assert base.threshold_verdict(None, 1.0) == "inconclusive"
    assert base.all_verdicts(["holds", "holds"]) == "holds"
    assert base.all_verdicts(["holds", "inconclusive"]) == "inconclusive"
    assert base.all_verdicts(["inconclusive", "does not hold"]) == "does not hold"
    assert base.all_verdicts([]) == "inconclusive"
    assert base.verdict_of(True, True) == "holds"
    assert base.verdict_of(False, True) == "does not hold"
    assert base.verdict_of(False, False) == "inconclusive"


def test_claim_rejects_an_unknown_verdict():
    with pytest.raises(ValueError, match="'maybe' is not one of"):
        Claim("c", "s", "p", {}, "r", "maybe")


def test_mean_std_and_formatting():
    m, s = base.mean_std([1.0, 2.0, 3.0, None, math.nan, INF])
    assert m == 2.0 and s == 1.0
    assert base.mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in base.mean_std([]))
    assert base.fmt(12345) == "12,345"
    assert base.fmt(0.000123456) == "0.0001235"
    assert base.fmt(INF) == "∞"
    assert base.fmt_mean_std([1.0, 3.0]) == "2 ± 1.4"


def test_deep_update_merges_sections_and_leaves_the_base_alone():
    cfg = {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}
    new = base.deep_update(cfg, {"a": {"c": {"d": 3}}, "e": [2]})
    assert new == {"a": {"b": 1, "c": {"d": 3}}, "e": [2]}
    assert cfg == {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}


# ------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------


def _toy(steps: int = 20, topology: str = "toy_uplink") -> dict:
    return base.deep_update(example_config(topology), {"steps": steps, "metrics": {"every": 5}, "plots": False})


def test_run_many_runs_then_reuses_identical_configs(tmp_path):
    ctx = Context("t", "small", [0], tmp_path)
    first = ctx.run_many({"up": _toy(), "bi": _toy(topology="toy_bidirectional")})
    assert list(first) == ["up", "bi"]  # the order asked for
    up = first["up"]
    assert up.completed and up.summary["steps"] == 20
    assert up.metrics["step"] == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert up.final("suboptimality") == pytest.approx(up.metrics["suboptimality"][-1])
    xs, ys = up.series("step", "rho_hat")
    assert len(xs) == len(ys) and all(not math.isnan(v) for v in ys)
    stamp = (tmp_path / "runs" / "up" / "metrics.csv").stat().st_mtime_ns
    again = Context("t", "small", [0], tmp_path).run_many({"up": _toy()})
    assert (tmp_path / "runs" / "up" / "metrics.csv").stat().st_mtime_ns == stamp  # reused, not rerun
    assert again["up"].metrics["suboptimality"] == up.metrics["suboptimality"]
    changed = Context("t", "small", [0], tmp_path).run_many({"up": _toy(steps=10)})
    assert changed["up"].summary["steps"] == 10  # a different config is run again


def test_run_many_rejects_unsafe_keys(tmp_path):
    with pytest.raises(ValueError, match="must match"):
        Context("t", "small", [0], tmp_path).run_many({"../x": _toy()})


@pytest.mark.multiprocess
def test_run_many_in_parallel_processes_gives_the_serial_result(tmp_path):
    serial = Context("t", "small", [0], tmp_path / "a").run_many({"up": _toy(), "bi": _toy(topology="toy_bidirectional")})
    parallel = Context("t", "small", [0], tmp_path / "b", processes=2).run_many(
        {"up": _toy(), "bi": _toy(topology="toy_bidirectional")})
    for key in ("up", "bi"):
        assert parallel[key].metrics["suboptimality"] == serial[key].metrics["suboptimality"]


# ------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------


FALLS = ClaimSpec("falls", "F - F* falls", "paper: it falls", "holds when below the start", ("F - F*",),
                  "a run that does not move")


def _fake(name: str, verdict_from_run: bool = True, declared=(FALLS,)) -> Reproduction:
    def run(ctx: Context) -> list[Claim]:
        res = ctx.run_many({"up": _toy(steps=10)})["up"]
        value = res.final("suboptimality")
        ctx.note("a note for the report")
        start = res.metrics["suboptimality"][0]
        return [FALLS.judge(base.threshold_verdict(value, start), {"F-F* final": value},
                            margin=base.margin_text("F-F*", value, start), agreed="1/1 seeds")]

    return Reproduction(name=name, paper="003", title="fake", run=run, settings={"small": "tiny toy"},
                        full_data=("mnist",), expected_runs=lambda scale, seeds: 1, claims=declared, seeds=4)


def test_execute_writes_summary_and_report(tmp_path):
    summary = base.execute(_fake("fake"), "small", 2, tmp_path / "fake")
    written = json.loads((tmp_path / "fake" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["seeds"] == 2 and written["runs"] == 1 and written["status"] == "completed"
    assert written["cpu_seconds"] > 0
    (claim,) = written["claims"]
    assert claim["verdict"] == "holds" and claim["rule"] == "holds when below the start"
    assert claim["agreed"] == "1/1 seeds" and claim["margin"].startswith("F-F* ") and "(+" in claim["margin"]
    assert claim["falsified_by"] == "a run that does not move" and claim["reads"] == ["F - F*"]
    report = (tmp_path / "fake" / "report.md").read_text()
    assert "| **falls** | **holds** | F-F* " in report and "| 1/1 seeds | holds when below the start |" in report
    assert "*Falsification test*: a run that does not move" in report
    assert "a note for the report" in report and "2 seed(s) (0, 1)" in report


def test_execute_uses_the_reproductions_own_seeds_and_checks_its_declared_claims(tmp_path):
    assert base.execute(_fake("fake"), "small", None, tmp_path / "a")["seeds"] == 4
    other = ClaimSpec("rises", "s", "p", "r", ("x",), "f")
    with pytest.raises(RuntimeError, match="declared \\['rises'\\]"):
        base.execute(_fake("fake", declared=(other,)), "small", 1, tmp_path / "b")


def test_a_diverged_run_never_supports_a_claim():
    c = FALLS.judge("holds", {}, diverged=["run_s1"])
    assert c.verdict == "inconclusive" and "run_s1" in c.explanation and c.diverged == ("run_s1",)
    assert FALLS.judge("does not hold", {}, diverged=["x"]).verdict == "does not hold"


def _series_run(values, status="completed"):
    return RunResult("r", tmp_dir(), {}, {"status": status}, {"step": [0.0, 1.0, 2.0], "loss": values})


def tmp_dir():
    from pathlib import Path

    return Path(".")


def test_ended_worse_compares_the_last_value_with_the_first():
    assert base.ended_worse(_series_run([0.44, 1.0, 1.5]), "loss")
    assert not base.ended_worse(_series_run([2.0, 1.0, 0.5]), "loss")
    assert base.ended_worse(_series_run([0.9, 0.5, 0.2]), "loss", higher_is_better=True)
    assert base.ended_worse(_series_run([2.0, 1.0, math.nan]), "loss")
    assert base.ended_worse(_series_run([2.0, 1.0, 0.5], status="diverged"), "loss")
    assert base.diverged_runs([_series_run([1.0, 2.0, 3.0])], "loss") == ["r"]


def test_slack_margins_and_volume_matching():
    assert base.slack(0.8, 1.0) == pytest.approx(0.2) and base.slack(1.1, 1.0) == pytest.approx(-0.1)
    assert base.slack(3.0, 2.0, below=False) == pytest.approx(0.5) and base.slack(None, 1.0) == -INF
    assert base.margin_text("ratio", 1.2, 1.5) == "ratio 1.2 vs ≤ 1.5 (+20%)"
    assert base.worst([1.0, None, 2.0]) == INF and base.worst([1.0, 3.0]) == 3.0
    assert base.worst([1.0, 3.0], largest=False) == 1.0
    assert base.agreement([True, False, True]) == "2/3 seeds"
    assert base.volumes_matched([100, 100, 100], [104, 94, 100]) == [True, False, True]  # 4% and 6% gaps
    assert base.volume_gap(100, 95) == pytest.approx(0.05)


def test_paired_outcomes_count_ties_and_missing_values():
    assert base.paired_outcomes([1, 2, 2, None, INF], [2, 1, 2, 1, INF]) == [True, False, False, None, None]


def test_full_scale_without_its_data_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "missing_data", lambda names, data_dir=None: [
        f"{n}: missing /nowhere/{n} (get it with: gradsparse data download {n})" for n in names])
    with pytest.raises(base.DataMissing, match="gradsparse data download mnist"):
        base.execute(_fake("fake"), "full", 1, tmp_path / "fake")
    written = json.loads((tmp_path / "fake" / "summary.json").read_text())
    assert written["status"] == "missing data" and "/nowhere/mnist" in written["missing"][0]
    assert not (tmp_path / "fake" / "runs").exists()  # nothing ran


def test_execute_rejects_bad_scale_and_seeds(tmp_path):
    with pytest.raises(ValueError, match="'huge'"):
        base.execute(_fake("fake"), "huge", 1, tmp_path)
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        base.execute(_fake("fake"), "small", 0, tmp_path)


@pytest.mark.multiprocess
def test_suite_runs_all_and_indexes_even_when_one_breaks(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")

    table = {"fake-a": _fake("fake-a"),
             "fake-b": Reproduction(name="fake-b", paper="000", title="broken", run=broken, settings={})}
    monkeypatch.setattr(reproduce, "reproductions", lambda: table)
    summaries = suite.run_all(list(table), "small", 1, tmp_path, processes=2, progress=False)
    assert summaries["fake-a"]["status"] == "completed"
    assert summaries["fake-b"]["status"] == "failed" and "boom" in summaries["fake-b"]["message"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index == {"fake-a": {"status": "completed", "holds": 1, "does not hold": 0, "inconclusive": 0},
                     "fake-b": {"status": "failed", "holds": 0, "does not hold": 0, "inconclusive": 0}}
    md = (tmp_path / "index.md").read_text()
    assert "[fake-a](fake-a/report.md)" in md and "failed: RuntimeError: boom" in md
    assert "<b>holds</b>" in (tmp_path / "index.html").read_text()


# ------------------------------------------------------------------------------------------
# the command line and the first reproduction
# ------------------------------------------------------------------------------------------


def test_cli_lists_and_rejects(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in reproduce.reproductions():
        assert name in listed
    assert cli.main(["reproduce", "no-such-thing"]) == 2
    assert "unknown reproduction 'no-such-thing'" in capsys.readouterr().err
    assert cli.main(["reproduce", "zou-toy", "--seeds", "0"]) == 2


@pytest.mark.multiprocess
def test_zou_toy_end_to_end(tmp_path, capsys):
    assert cli.main(["reproduce", "zou-toy", "--out", str(tmp_path), "--no-progress", "--seeds", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    verdicts = {c["id"]: c for c in summary["claims"]}
    # the toy is deterministic: F - F* of both uplink-compressed settings settles near 15-20, far below the start
    match = verdicts["bidirectional-matches-uplink"]
    assert match["measured"]["F-F* initial"] == pytest.approx(10755.5556, rel=1e-6)
    assert match["verdict"] == "holds"
    agg = verdicts["aggregate-density-near-NK/d"]
    assert agg["measured"]["N*K/d"] == pytest.approx(0.03)
    assert 0.024 <= agg["measured"]["aggregate density (uplink-only, late mean)"] <= 0.03 + 1e-12
    assert agg["verdict"] == "holds"
    for fig in summary["figures"]:
        assert (tmp_path / fig).stat().st_size > 10_000
    # the command prints one line per claim with the verdict the summary holds, and nothing else as a claim
    printed = re.findall(r"^ *(holds|does not hold|inconclusive)  (\S+): ", capsys.readouterr().out, re.M)
    assert printed == [(c["verdict"], c["id"]) for c in summary["claims"]]


def test_seed_band_averages_on_a_common_interpolated_axis():
    from gradsparse.experiments.plots import seed_band

    # two seeds logged at different byte counts: y = x and y = 2x; the common grid is their overlap [1, 3]
    a = ([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0])
    b = ([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0])
    xs, centre, lo, hi = seed_band([a, b], points=5)
    assert list(xs) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert list(centre) == pytest.approx([1.5 * x for x in xs])  # the mean of x and 2x at the same x
    assert list(hi - centre) == pytest.approx([0.5 * x for x in xs]) and list(centre - lo) == list(hi - centre)
    # on a log y axis the centre is the geometric mean and the band a factor: 1 and 100 -> 10, band [1, 100]
    xs, centre, lo, hi = seed_band([([1.0, 2.0], [1.0, 1.0]), ([1.0, 2.0], [100.0, 100.0])], logy=True)
    assert list(xs) == [1.0, 2.0] and list(centre) == pytest.approx([10.0, 10.0])
    assert list(lo) == pytest.approx([1.0, 1.0]) and list(hi) == pytest.approx([100.0, 100.0])
    # curves that share no x range give no band; a repeated x keeps its last logged y
    assert seed_band([([0.0, 1.0], [1.0, 1.0]), ([2.0, 3.0], [1.0, 1.0])]) is None
    xs, centre, _, _ = seed_band([([0.0, 1.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0])])
    assert list(xs) == [0.0, 1.0, 2.0] and list(centre) == [5.0, 3.0, 2.0]


def test_a_run_stops_at_its_target(tmp_path):
    """asynchronous.target.stop ends the run at the first logged row reaching the target."""
    from gradsparse.reproduce import candela

    s = {**candela.SMALL, "task": {"name": "digits_lenet"}, "steps": 60, "every": 10, "target": 0.12}
    res = Context("t", "small", [0], tmp_path).run_many({"a": candela.run_config("ASGD", 1.0, 0, s)})["a"]
    assert res.summary["stopped_at_target"] is True and res.summary["status"] == "completed"
    assert res.summary["steps"] == res.summary["steps_to_target"] < 60
    assert res.metrics["step"][-1] == res.summary["steps"]
