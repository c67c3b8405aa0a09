"""The up-front memory estimate (issue 23): within 2x of the measured peak RSS, and a run that
cannot fit is refused before its task is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gradsparse.cli import main
from gradsparse.config import load_config
from gradsparse.experiments import build, memory_estimate

from conftest import write_config

HUGE = {
    "name": "huge", "steps": 10,
    "task": {"name": "linreg", "options": {"n_samples": 10000, "n_features": 1000000, "feature_density": 0.001}},
    "workers": {"count": 10000, "batch_size": 16},
    "algorithm": {"compressor": {"kind": "topk", "density": 0.001}},
    "memory_limit_gb": 64, "plots": False, "progress": False,
}


def test_a_run_that_cannot_fit_is_refused_before_its_task_is_built(tmp_path, capsys, monkeypatch):
    """The audit's case: 10,000 workers at d = 1e6 spent 108 s and 4 GiB building the task
    before the refusal. The [N, d] tensors alone (10,000 x 1e6 x 4 bytes x 6) exceed the limit."""
    monkeypatch.chdir(tmp_path)

    def never(cfg):
        raise AssertionError("the task was built before the refusal")

    monkeypatch.setattr(build, "build_task", never)
    rc = main(["run", str(write_config(tmp_path, HUGE))])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "10000 workers x d = 1000000 x 4 bytes x 6 tensors" in err and "more than the limit 64 GiB" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_the_up_front_bound_never_exceeds_the_full_estimate():
    raw = {**HUGE, "workers": {"count": 20, "batch_size": 4},
           "task": {"name": "linreg", "options": {"n_samples": 400, "n_features": 3000, "feature_density": 0.01}}}
    cfg = load_config(raw)
    before, how = memory_estimate.estimate_memory_before_task(cfg)
    engine = build.build_engine(cfg)
    after, _ = memory_estimate.estimate_memory(cfg, engine.task, engine.layout, engine.alg)
    assert before <= after and "20 workers x d = 3000" in how
    # tasks whose d the options do not fix are estimated once built
    assert memory_estimate.estimate_memory_before_task(load_config({**raw, "task": {"name": "digits_mlp"}})) is None


CHILD = r'''
import json, resource, sys
import torch
torch.set_num_threads(1)
from gradsparse.config import load_config
from gradsparse.experiments import build, memory_estimate
from gradsparse.metrics import eval_metrics
raw = json.loads(sys.argv[1])
cfg = load_config(raw)
engine = build.build_engine(cfg)
need, how = memory_estimate.estimate_memory(cfg, engine.task, engine.layout, engine.alg)
for _ in range(3):
    engine.step()
eval_metrics(engine, ["loss", "test_accuracy"])
print(json.dumps({"estimate": need, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''
CASES = {
    "sparse linreg d=1e5, 200 x 16": {"task": {"name": "linreg", "options": {"n_samples": 5000, "n_features": 100000,
                                                                           "feature_density": 0.01}},
                                      "workers": {"count": 200, "batch_size": 16}},
    "mnist5k MLP, 500 x 4, momentum": {"task": {"name": "mnist5k_mlp"}, "workers": {"count": 500, "batch_size": 4},
                                       "algorithm": {"compressor": {"kind": "topk", "density": 0.01},
                                                     "momentum": {"kind": "update"}}},
    "toy float64, 3 x 100000": {"task": {"name": "toy_quadratic", "options": {"dtype": "float64"}},
                                "workers": {"count": 3, "batch_size": 100000},
                                "algorithm": {"compressor": {"kind": "topk", "k": 1}, "topology": {"kind": "ps_uplink"}}},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.multiprocess
def test_the_estimate_is_within_2x_of_the_measured_peak_rss(case):
    raw = {"steps": 100, "memory_check": False, "metrics": {"every": 2},
           "algorithm": {"compressor": {"kind": "topk", "density": 0.01}}, **CASES[case]}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.5 <= r["estimate"] / r["peak"] <= 2.0, (case, r["estimate"] / 2**30, r["peak"] / 2**30)
