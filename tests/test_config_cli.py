"""Config validation, overrides, the CLI and the run directory."""

import json
import math
from pathlib import Path

import pytest
import yaml

from gradsparse.cli import main
from gradsparse.config import ConfigError, load_config
from gradsparse.experiments.runner import run

from conftest import read_csv, write_config

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "gradsparse" / "examples"

TOY = {
    "name": "t",
    "task": {"name": "toy_quadratic"},
    "workers": {"count": 3, "batch_size": "full"},
    "algorithm": {"compressor": {"kind": "topk", "k": 1}, "feedback": "ef", "topology": {"kind": "ps_uplink"}},
    "schedule": {"lr": 0.01},
    "steps": 20,
    "metrics": {"every": 5},
    "plots": False,
    "progress": False,
}


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"steps": -3}, "steps"),
        ({"workers": {"count": 0}}, "workers.count"),
        ({"algorithm": {"compressor": {"kind": "topq", "k": 1}}}, "algorithm.compressor.kind"),
        ({"algorithm": {"compressor": {"kind": "topk"}}}, "exactly one of k (count) or density"),
        ({"algorithm": {"compressor": {"kind": "topk", "density": 1.5}}}, "'algorithm.compressor': topk option density=1.5: top-k density must be a finite number in (0, 1]"),
        ({"algorithm": {"feedback": "memroy"}}, "algorithm.feedback"),
        ({"algorithm": {"topology": {"kind": "bidirectional"}}}, "needs down_compressor"),
        ({"schedule": {"lr": -1}}, "schedule.lr"),
        ({"schedule": {"kind": "stagewise"}}, "stage_steps"),
        ({"metrics": {"names": ["loss", "losss"]}}, "losss"),
        ({"typo_key": 1}, "typo_key"),
        ({"task": {"name": "no_such_task"}}, "no_such_task"),
        ({"algorithm": {"compressor": {"kind": "topk", "k": 1000}}}, "k = 1000"),
        ({"workers": {"count": 3, "batch_size": 0}}, "batch_size"),
        ({"value_dtype": "fp8"}, "value_dtype"),
        ({"schedule": {"momentum": 0.9}}, "schedule.momentum"),
        ({"simulator": {"gradient_path": "fast"}}, "simulator.gradient_path"),
        ({"simulator": {"gradient_path": "grouped"}}, "config key 'simulator.gradient_path': gradient_path 'grouped' needs"),
        ({"engine": "warp"}, "config key 'engine'"),
        ({"algorithm": {"compressor": {"kind": "topk", "k": 1, "threshold": 2.0}}}, "has no option 'threshold'"),
        ({"algorithm": {"compressor": {"kind": "hard_threshold", "threshold": {"rule": "vibes"}}}}, "unknown threshold rule"),
        ({"algorithm": {"compressor": {"kind": "topk", "k": 1}, "feedback": "ef",
                        "topology": {"kind": "downlink_only", "down_compressor": {"kind": "topk", "k": 1}}}},
         "downlink_only sends alpha g uncompressed"),
        ({"algorithm": {"compressor": {"kind": "identity"}, "feedback": "memory",
                        "topology": {"kind": "downlink_only", "down_compressor": {"kind": "topk", "k": 1}}}},
         "downlink_only keeps no worker memory"),
        ({"algorithm": {"compressor": {"kind": "topk", "k": 1}, "topology": {"kind": "ps_uplink",
                        "down_compressor": {"kind": "topk", "k": 1}}}}, "sends no compressed downlink"),
        ({"algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.1}, "feedback": "ef-scaled"},
          "schedule": {"lr": 0.01, "warmup_epochs": 1.0, "warmup_start": 0.0}}, "ef-scaled divides by the step size"),
        ({"algorithm": {"compressor": {"kind": "topk", "k": 1}, "momentum": {"kind": "gradient", "masking": True}}},
         "masking applies to momentum 'update' only"),
        # collectives (gradsparse.comm.collectives)
        ({"collective": "ring"}, "config key 'collective'"),
        ({"collective": "sharded"}, "collective 'sharded' runs topology all_to_all or bidirectional, not 'ps_uplink'"),
        ({"collective": "allreduce", "algorithm": {"compressor": {"kind": "randomk", "k": 1}, "topology": {"kind": "all_to_all"}}},
         "needs algorithm.compressor {kind: randomk, shared_support: true}, got kind 'randomk' with shared_support false"),
        ({"collective": "allreduce", "algorithm": {"compressor": {"kind": "topk", "k": 1}, "topology": {"kind": "all_to_all"}}},
         "got kind 'topk'"),
        ({"collective": "sharded", "algorithm": {"compressor": {"kind": "topk", "k": 1}, "topology": {
            "kind": "bidirectional", "down_compressor": {"kind": "topk", "k": 1}}}},
         "down_compressor must be {kind: topk, density: RHO}"),
        ({"collective": "sharded", "engine": "async"}, "engine 'async' runs an asynchronous parameter server"),
        ({"algorithm": {"compressor": {"kind": "randomk", "k": 1, "shared_support": "yes"}}}, "shared_support must be true or false"),
    ],
)
def test_malformed_configs_give_one_clear_line_and_no_run_dir(tmp_path, capsys, patch, needle):
    cfg = json.loads(json.dumps(TOY))
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path = write_config(tmp_path, cfg)
    out = tmp_path / "run"
    rc = main(["run", str(path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_file_and_bad_yaml(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    assert main(["run", str(p)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_overrides_apply_and_are_validated():
    cfg = load_config(dict(TOY), ["workers.count=5", "algorithm.compressor.k=3", "schedule.lr=0.5"])
    assert cfg.workers.count == 5 and cfg.algorithm.compressor.k == 3 and cfg.schedule.lr == 0.5
    with pytest.raises(ConfigError, match="workers.count"):
        load_config(dict(TOY), ["workers.count=zero"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(dict(TOY), ["workers.count"])


def test_run_directory_round_trip_reproduces_metrics(tmp_path):
    path = write_config(tmp_path, TOY)
    a = tmp_path / "a"
    assert main(["run", str(path), "--out", str(a), "--no-progress"]) == 0
    for f in ("config.yaml", "metrics.csv", "summary.json", "checkpoint.pt"):
        assert (a / f).exists(), f
    b = tmp_path / "b"
    assert main(["run", str(a / "config.yaml"), "--out", str(b), "--no-progress"]) == 0
    ra, rb = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    drop = {"wall_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == rb
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    sa.pop("wall_seconds"), sb.pop("wall_seconds"), sa.pop("name"), sb.pop("name")
    assert sa.pop("run_id") != sb.pop("run_id")  # a run started from a run directory's config is a new run
    assert sa == sb  # config_sha256 included: the same resolved config
    assert [int(r["step"]) for r in ra] == [0, 5, 10, 15, 20]
    assert sa["steps"] == 20


def test_set_overrides_topology_on_the_command_line(tmp_path):
    path = write_config(tmp_path, TOY)
    out = tmp_path / "bi"
    rc = main([
        "run", str(path), "--out", str(out), "--no-progress",
        "--set", "algorithm.topology.kind=bidirectional",
        "--set", "algorithm.topology.down_compressor={kind: topk, k: 1}",
    ])
    assert rc == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["algorithm"]["topology"]["kind"] == "bidirectional"
    s = json.loads((out / "summary.json").read_text())
    assert "down=top-k(k=1" in s["algorithm"]


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_every_example_runs_a_few_steps(name, tmp_path):
    cfg = load_config(EXAMPLES / f"{name}.yaml", ["steps=3", "epochs=null", "metrics.every=1", "metrics.residual_ratio.steps=[]",
                                                     "plots=false", "progress=false"])
    assert cfg.name == name
    out = run(cfg, tmp_path / name)
    rows = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["status"] == "completed"
    # bytes are counted from step 1 on and never shrink; under a synchronous engine every step sends a
    # frame per worker (a header at least); the total is the last row's
    sent = [int(r["uplink_bytes"]) for r in rows]
    assert sent[0] == 0 < sent[1] and all(b >= a for a, b in zip(sent, sent[1:])), sent
    if cfg.engine == "sync":
        assert all(b > a for a, b in zip(sent, sent[1:])), sent
    assert sent[-1] == summary["uplink_bytes"]
    assert all(math.isfinite(float(r["loss"])) for r in rows)


def test_gradient_paths_give_the_same_run_and_are_recorded(tmp_path):
    runs = {}
    for path in ("auto", "vmap"):
        out = tmp_path / path
        rc = main([
            "run", "digits_mlp_topk", "--out", str(out), "--no-progress",
            "--set", "steps=20", "--set", "metrics.every=10", "--set", "plots=false",
            "--set", f"simulator.gradient_path={path}",
        ])
        assert rc == 0
        runs[path] = (json.loads((out / "summary.json").read_text()), read_csv(out / "metrics.csv"))
    (sa, ra), (sv, rv) = runs["auto"], runs["vmap"]
    assert (sa["gradient_path"], sa["in_place_memory"]) == ("grouped", True)
    assert (sv["gradient_path"], sv["in_place_memory"]) == ("vmap", False)
    assert sa["uplink_bytes"] == sv["uplink_bytes"]
    for a, v in zip(ra, rv):
        assert float(a["loss"]) == pytest.approx(float(v["loss"]), rel=1e-4)
