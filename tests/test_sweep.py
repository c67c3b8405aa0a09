"""gradsparse sweep: a grid of runs in parallel processes with a table, validated up front."""

import csv
import json

import pytest

from gradsparse.cli import main
from gradsparse.config import ConfigError
from gradsparse.experiments.sweep import parse_grid


def test_parse_grid_and_errors():
    assert parse_grid(["a.b=1,2.5", "c=x,null"]) == {"a.b": [1, 2.5], "c": ["x", None]}
    for bad, needle in (([], "at least one"), (["a"], "dotted.key=value"), (["a..b=1"], "not a dotted config key"),
                        (["a=1", "a=2"], "given twice")):
        with pytest.raises(ConfigError, match=needle):
            parse_grid(bad)


@pytest.mark.multiprocess
def test_sweep_runs_every_point_and_seed_and_tabulates(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", "async_lenet_lambda1", "--grid", "asynchronous.network.rate=1,10",
               "--grid", "algorithm.compressor.density=0.1,1.0", "--seeds", "2", "--processes", "2",
               "--set", "steps=4", "--set", "metrics.every=2", "--set", "plots=false", "--out", str(out), "--no-progress"])
    assert rc == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["seed"] for r in rows} == {"0", "1"}
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and all(r["seeds"] == "2" for r in table)
    # the table's mean is the mean of the runs' final values
    for point in table:
        runs = [r for r in rows if r["asynchronous.network.rate"] == point["asynchronous.network.rate"]
                and r["algorithm.compressor.density"] == point["algorithm.compressor.density"]]
        mean = sum(float(r["final_loss"]) for r in runs) / 2
        assert float(point["final_loss_mean"]) == pytest.approx(mean)
    summaries = [json.loads(p.read_text()) for p in (out / "runs").glob("*/summary.json")]
    assert len(summaries) == 8 and all(s["engine"] == "async" and s["steps"] == 4 for s in summaries)
    # the printed table is table.csv: one line per grid point, the same means
    printed = [ln.split(" | ") for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "---" not in ln]
    header, body = [c.strip("| ") for c in printed[0]], [[c.strip("| ") for c in ln] for ln in printed[1:]]
    assert header[:4] == ["asynchronous.network.rate", "algorithm.compressor.density", "seeds", "diverged"]
    assert len(body) == len(table) == 4
    loss = header.index("final_loss")
    for cells, point in zip(body, table):
        assert cells[:4] == [point["asynchronous.network.rate"], point["algorithm.compressor.density"], "2", "0"]
        assert float(cells[loss].split(" ± ")[0]) == pytest.approx(float(point["final_loss_mean"]), rel=5e-4)


def test_sweep_rejects_a_bad_grid_value_before_running(tmp_path, capsys):
    rc = main(["sweep", "async_lenet_lambda1", "--grid", "asynchronous.network.rate=1,-3", "--out", str(tmp_path / "s")])
    assert rc == 2
    assert "asynchronous.network.rate" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.multiprocess
def test_a_diverging_grid_point_is_tabulated_not_fatal(tmp_path, capsys):
    """A step size that diverges is a result of the sweep: its runs say 'diverged' in sweep.csv,
    the table counts them and shows no mean for them, and the other points are unaffected."""
    out = tmp_path / "sweep"
    rc = main(["sweep", "linreg_topk_memory", "--grid", "schedule.lr=0.05,50", "--processes", "2",
               "--set", "steps=30", "--set", "metrics.every=10", "--set", "metrics.residual_ratio.steps=[]",
               "--set", "plots=false", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    with open(out / "sweep.csv") as f:
        rows = {r["schedule.lr"]: r for r in csv.DictReader(f)}
    assert rows["0.05"]["status"] == "completed" and float(rows["0.05"]["final_loss"]) < 1
    assert rows["50"]["status"] == "diverged" and rows["50"]["final_loss"] == ""
    with open(out / "table.csv") as f:
        table = {r["schedule.lr"]: r for r in csv.DictReader(f)}
    assert (table["0.05"]["diverged"], table["50"]["diverged"]) == ("0", "1")
    assert table["50"]["final_loss_mean"] == "nan"
    assert json.loads(next((out / "runs").glob("*lr=50*")).joinpath("summary.json").read_text())["status"] == "diverged"
