"""Inputs the audit of issue 23 found accepted or refused wrongly: numbers written in exponent
form, run names in any script, asynchronous laws that break the virtual clock, Kardam's f."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from gradsparse.cli import main
from gradsparse.config import ConfigError, load_config
from gradsparse.experiments import build, runner

sys.path.insert(0, str(Path(__file__).parent))
from test_runs import TOY  # noqa: E402

from conftest import patched, write_config  # noqa: E402


# ---- numbers in exponent form ---------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("1e-2", 0.01), ("1E-2", 0.01), ("1.0e-2", 0.01), ("5.e-3", 0.005),
                                         ("+1e-1", 0.1), ("1e0", 1)])
def test_exponent_numbers_are_numbers_wherever_a_number_is_expected(text, value):
    """YAML 1.1 (PyYAML) reads 1e-2 as text; YAML 1.2 and JSON read it as a number."""
    cfg = load_config(patched(TOY, **{"algorithm.compressor": {"kind": "topk", "density": text}}),
                      [f"schedule.lr={text}"])
    assert cfg.schedule.lr == value and type(cfg.schedule.lr) is float
    assert cfg.algorithm.compressor.options()["density"] == value
    assert load_config(patched(TOY, **{"schedule.milestones": [text]})).schedule.milestones == [value]


def test_whole_exponent_numbers_are_integers_where_an_integer_is_expected():
    cfg = load_config(patched(TOY, steps="1e3", **{"metrics.every": "2E1"}))
    assert cfg.steps == 1000 and cfg.metrics.every == 20
    raw = patched(TOY, **{"task": {"name": "linreg", "options": {"n_samples": "1e3", "feature_density": "1e-1"}}})
    task = build.build_task(load_config(raw))
    assert task.n_train == 1000 and task.info.get("feature_density", 0.1) == pytest.approx(0.1)


def test_exponent_form_run_through_the_command_line(tmp_path, capsys):
    cfg = write_config(tmp_path, patched(TOY, steps=5))
    out = tmp_path / "r"
    assert main(["run", str(cfg), "--out", str(out), "--set", "algorithm.compressor={kind: topk, density: 1e-2}",
                 "--set", "schedule.lr=1e-2"]) == 0
    # the resolved config holds the numbers, not the text "1e-2" (PyYAML reads 1e-2 as a string)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    density, lr = resolved["algorithm"]["compressor"]["density"], resolved["schedule"]["lr"]
    assert type(density) is float and type(lr) is float and density == lr == 0.01


def test_text_that_is_not_a_number_keeps_its_hint_and_names_stay_text():
    with pytest.raises(ConfigError, match="schedule.lr.*'1e-2x'"):
        load_config(patched(TOY), ["schedule.lr=1e-2x"])
    with pytest.raises(ConfigError, match=r"lr.*must be a finite number"):
        load_config(patched(TOY), ["schedule.lr=1e400"])
    assert load_config(patched(TOY, name="1e5")).name == "1e5"  # a name is text


# ---- run names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Läufe_1", "実験-2", "café", "e\u0301t", "Δx+1.5", "ok.run+1"])
def test_unicode_run_names_are_one_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    out = runner.run(load_config(patched(TOY, name=name, steps=3)))
    assert out == Path("runs") / name and (tmp_path / "runs" / name / "summary.json").is_file()
    assert json.loads((out / "summary.json").read_text())["name"] == name


@pytest.mark.parametrize("name, needle", [("../x", "starts with"), (".hidden", "starts with"), ("a/b", "'/'"),
                                          ("-x", "starts with"), ("\u0301x", "starts with"), ("tab\there", "'\\t'"),
                                          ("a\x00b", "'\\x00'"), ("é" * 101, "200 bytes"), ("", "empty")])
def test_run_names_that_are_not_one_folder_are_refused(name, needle):
    with pytest.raises(ConfigError, match="config key 'name'") as info:
        load_config(patched(TOY, name=name))
    assert needle in str(info.value)


# ---- asynchronous laws and Kardam -----------------------------------------------------------------------
ASYNC = patched(TOY, engine="async", steps=20, **{"workers.count": 3, "workers.batch_size": 1})


@pytest.mark.parametrize("patch, needle", [
    ({"compute": {"speeds": [1.0, -2.0, 1.0]}}, "speeds[1] must be a finite number >= 0"),
    ({"network": {"offset": 1e308}}, "virtual time"),
    ({"network": {"rate": 1e-308}}, "virtual time"),
    ({"network": {"bandwidth": 1e-300}}, "virtual time"),
    ({"compute": {"kind": "constant", "value": 1e299}}, "virtual time"),
    ({"kardam": {"enabled": True, "byzantine": 3}}, "byzantine f = 3 must be < workers.count = 3"),
])
def test_asynchronous_laws_that_break_the_clock_and_kardam_f_are_refused(tmp_path, capsys, monkeypatch, patch, needle):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", str(write_config(tmp_path, {**ASYNC, "asynchronous": patch}))])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_large_but_finite_asynchronous_times_still_run(tmp_path):
    raw = {**ASYNC, "asynchronous": {"network": {"offset": 1e200}, "compute": {"speeds": [0.0, 1.0, 2.0]},
                                     "kardam": {"enabled": True, "byzantine": 2}}}
    out = runner.run(load_config(raw), tmp_path / "r")
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and 1e200 <= s["virtual_time"] < float("inf")
