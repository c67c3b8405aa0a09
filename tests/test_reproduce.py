"""The reproduction framework: verdict rules, reusable runs, reports, the suite and its index."""

from __future__ import annotations

import json
import math

import pytest

from gradsparse import cli, reproduce
from gradsparse.reproduce import base, suite
from gradsparse.reproduce.base import Claim, Context, Reproduction, example_config

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


def test_run_many_in_parallel_processes_gives_the_serial_result(tmp_path):
    serial = Context("t", "small", [0], tmp_path / "a").run_many({"up": _toy(), "bi": _toy(topology="toy_bidirectional")})
    parallel = Context("t", "small", [0], tmp_path / "b", processes=2).run_many(
        {"up": _toy(), "bi": _toy(topology="toy_bidirectional")})
    for key in ("up", "bi"):
        assert parallel[key].metrics["suboptimality"] == serial[key].metrics["suboptimality"]


# ------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------


def _fake(name: str, verdict_from_run: bool = True) -> Reproduction:
    def run(ctx: Context) -> list[Claim]:
        res = ctx.run_many({"up": _toy(steps=10)})["up"]
        value = res.final("suboptimality")
        ctx.note("a note for the report")
        return [Claim("falls", "F - F* falls", "paper: it falls", {"F-F* final": value},
                      "holds when below the start", base.threshold_verdict(value, res.metrics["suboptimality"][0]))]

    return Reproduction(name=name, paper="003", title="fake", run=run, settings={"small": "tiny toy"},
                        full_data=("mnist",), expected_runs=lambda scale, seeds: 1)


def test_execute_writes_summary_and_report(tmp_path):
    summary = base.execute(_fake("fake"), "small", 2, tmp_path / "fake")
    written = json.loads((tmp_path / "fake" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["seeds"] == 2 and written["runs"] == 1 and written["status"] == "completed"
    (claim,) = written["claims"]
    assert claim["verdict"] == "holds" and claim["rule"] == "holds when below the start"
    report = (tmp_path / "fake" / "report.md").read_text()
    assert "| **falls**: F - F* falls | paper: it falls |" in report
    assert "**holds**" in report and "a note for the report" in report and "2 seed(s) (0, 1)" in report


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
    assert "holds" in capsys.readouterr().out
