"""TensorBoard output (``metrics.tensorboard`` / ``--tensorboard``), read back with tensorboard's
own event reader: every metric column against step and against uplink bytes equals metrics.csv,
the staleness histograms equal summary.json's, the config is there as text; a resumed run holds
every row once; sweeps write one run per grid point; the DDP hook logger's bytes per step."""

from __future__ import annotations

import csv
import json
import signal
import sys
from types import SimpleNamespace

import pytest

from gradsparse.cli import main
from gradsparse.config import ConfigError, load_config
from gradsparse.experiments.plots import read_metrics
from gradsparse.experiments.errors import RunInterrupted
from gradsparse.experiments.runner import resume, run

CONFIG = {
    "name": "tb", "task": {"name": "digits_mlp", "options": {"hidden": 8}}, "workers": {"count": 3, "batch_size": 4},
    "algorithm": {"compressor": {"kind": "topk", "density": 0.05}}, "schedule": {"lr": 0.1}, "steps": 20,
    "plots": False, "progress": False,
    "metrics": {"every": 5, "tensorboard": True,
                "names": ["step", "epoch", "loss", "test_accuracy", "density", "uplink_bytes", "mean_memory_norm"]},
}


def test_without_the_package_the_config_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"metrics.tensorboard.*pip install 'gradsparse\[tensorboard\]'"):
        run(load_config(CONFIG), tmp_path / "x")
    assert main(["run", "toy_uplink", "--tensorboard", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the tensorboard package" in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


tb = pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (optional extra)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def series(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def counts(histogram_value) -> dict[int, int]:
    """Staleness value -> updates, from buckets (s - 0.5, s + 0.5]."""
    return {round(limit - 0.5): int(c) for limit, c in zip(histogram_value.bucket_limit, histogram_value.bucket) if c}


def test_every_column_against_step_and_uplink_bytes_and_the_config(tmp_path):
    out = run(load_config(CONFIG), tmp_path / "r")
    acc = events(out)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20]
    for column in CONFIG["metrics"]["names"]:
        if column == "step":
            continue
        recorded = [r for r in rows if r[column] != ""]  # e.g. density: no message before step 1
        got = series(acc, f"{column}/by_step")
        assert [s for s, _ in got] == [int(r["step"]) for r in recorded], column
        assert [v for _, v in got] == pytest.approx([float(r[column]) for r in recorded], rel=1e-6), column
        if column != "uplink_bytes":
            by_bytes = series(acc, f"{column}/by_uplink_bytes")
            assert [s for s, _ in by_bytes] == [int(r["uplink_bytes"]) for r in recorded], column
    assert int(rows[-1]["uplink_bytes"]) > int(rows[1]["uplink_bytes"]) > 0
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    config_text = (out / "config.yaml").read_text()
    assert config_text.startswith("# gradsparse run ")  # the run-id header line is the file's own, not the config's
    assert config_text.split("\n", 1)[1] in text and "tensorboard: true" in text
    assert not acc.Tags()["histograms"]  # no staleness for a synchronous run


def test_async_staleness_histograms_equal_the_summary(tmp_path):
    cfg = {**CONFIG, "engine": "async", "workers": {"count": 4, "batch_size": 4},
           "algorithm": {"compressor": {"kind": "topk", "density": 0.05}, "feedback": "memory",
                         "topology": {"kind": "ps_uplink"}},
           "metrics": {**CONFIG["metrics"], "names": ["step", "loss", "uplink_bytes", "staleness_mean"]}}
    out = run(load_config(cfg), tmp_path / "a")
    acc = events(out)
    summary = json.loads((out / "summary.json").read_text())
    whole = acc.Histograms("staleness/all_updates")
    assert len(whole) == 1 and whole[0].step == 20
    assert counts(whole[0].histogram_value) == {int(k): v for k, v in summary["staleness_histogram"].items()}
    rows = acc.Histograms("staleness/since_previous_row")
    assert [h.step for h in rows] == [5, 10, 15, 20]
    total: dict[int, int] = {}
    for h in rows:
        assert h.histogram_value.num == 5  # the 5 updates since the previous row
        for s, c in counts(h.histogram_value).items():
            total[s] = total.get(s, 0) + c
    assert total == counts(whole[0].histogram_value)
    # the row's staleness_mean column is the mean of that row's histogram
    means = series(acc, "staleness_mean/by_step")
    assert [s for s, _ in means] == [5, 10, 15, 20]  # the first row (step 0) has no staleness
    for h, (_, mean) in zip(rows, means):
        assert h.histogram_value.sum / h.histogram_value.num == pytest.approx(mean)


def test_a_resumed_run_holds_every_row_once(tmp_path):
    cfg = load_config({**CONFIG, "checkpoint_every": 5})

    def stop_at_10(step):
        if step == 10:
            signal.raise_signal(signal.SIGINT)  # the runner finishes the step, checkpoints, stops

    with pytest.raises(RunInterrupted):
        run(cfg, tmp_path / "r", on_step=stop_at_10)
    first = series(events(tmp_path / "r"), "loss/by_step")
    assert [s for s, _ in first] == [0, 5, 10]
    out = resume(tmp_path / "r", progress=False)
    got = series(events(out), "loss/by_step")
    assert [s for s, _ in got] == [0, 5, 10, 15, 20]
    assert [v for _, v in got] == pytest.approx(read_metrics(out)["loss"], rel=1e-6)
    assert [v for _, v in got[:3]] == [v for _, v in first]
    byte_steps = [s for s, _ in series(events(out), "loss/by_uplink_bytes")]
    assert byte_steps == [int(b) for b in read_metrics(out)["uplink_bytes"]]


@pytest.mark.multiprocess
def test_run_and_sweep_flags(tmp_path, capsys):
    assert main(["run", "toy_uplink", "--set", "steps=6", "--tensorboard", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    assert "tensorboard: true" in (tmp_path / "r" / "config.yaml").read_text()
    assert series(events(tmp_path / "r"), "loss/by_step")
    assert main(["sweep", "toy_uplink", "--set", "steps=6", "--grid", "schedule.lr=0.01,0.02", "--processes", "1",
                 "--tensorboard", "--out", str(tmp_path / "sw"), "--no-progress"]) == 0
    capsys.readouterr()
    runs = sorted((tmp_path / "sw" / "runs").iterdir())
    assert len(runs) == 2
    finals = [series(events(r), "loss/by_step")[-1] for r in runs]
    assert finals[0][0] == finals[1][0] == 6 and finals[0][1] != finals[1][1]  # two step sizes, two runs


class _Writer:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def close(self):
        pass


@pytest.mark.parametrize("with_ledger", [True, False])
def test_hook_logger_bytes_per_step(with_ledger):
    from gradsparse.experiments.tensorboard import HookLogger

    if with_ledger:  # the hook state's byte ledger
        state = SimpleNamespace(step=0, ledger=SimpleNamespace(uplink_bytes=0, sent_bytes=0))
        counters = state.ledger
    else:  # counters on the state itself, no sent_bytes
        state = SimpleNamespace(step=0, uplink_bytes=0)
        counters = state
    w = _Writer()
    log = HookLogger(state, w)
    state.step, counters.uplink_bytes = 1, 120
    if with_ledger:
        counters.sent_bytes = 300
    log.log()
    state.step, counters.uplink_bytes = 3, 320  # two steps since the last call: 100 per step
    if with_ledger:
        counters.sent_bytes = 700
    written = log.log()
    assert written["uplink_bytes"] == 320 and written["uplink_bytes_per_step"] == 100
    assert ("hook/uplink_bytes_per_step", 120.0, 1) in w.scalars and ("hook/uplink_bytes_per_step", 100.0, 3) in w.scalars
    if with_ledger:
        assert written["sent_bytes_per_step"] == 200 and ("hook/sent_bytes", 700, 3) in w.scalars
    else:
        assert not any(t.startswith("hook/sent_bytes") for t, _, _ in w.scalars)


def test_hook_logger_writes_event_files(tmp_path):
    from gradsparse.experiments.tensorboard import HookLogger

    state = SimpleNamespace(step=0, ledger=SimpleNamespace(uplink_bytes=0))
    log = HookLogger(state, log_dir=tmp_path / "tb")
    for t in range(1, 4):
        state.step, state.ledger.uplink_bytes = t, 50 * t * t
        log.log()
    log.close()
    got = series(events(tmp_path / "tb"), "hook/uplink_bytes_per_step")
    assert got == [(1, 50.0), (2, 150.0), (3, 250.0)]
