"""The up-front memory estimate against the measured peak RSS (issue 23): each case runs in a fresh
process (three steps and an evaluation, ``memory_check`` off); prints one JSON line per case
with the peak, the estimate (``memory_estimate.estimate_memory``), their ratio, and the bound checked
before the task is built (``memory_estimate.estimate_memory_before_task``; null where the options do not
fix d). Needs about 10 GiB of memory for the largest case.

    python benchmarks/bench_memory_estimate.py [SUBSTRING ...]    # only the cases whose name holds one
"""
import json
import os
import subprocess
import sys
CHILD = r'''
import json, resource, sys
import torch
torch.set_num_threads(1)
from gradsparse.config import load_config
from gradsparse.experiments import build, memory_estimate
raw = json.loads(sys.argv[1]); raw.setdefault("steps", 1000); raw["memory_check"] = False
raw["metrics"] = {"every": 2}
cfg = load_config(raw)
pre = memory_estimate.estimate_memory_before_task(cfg)
engine = build.build_engine(cfg)
need, how = memory_estimate.estimate_memory(cfg, engine.task, engine.layout, engine.alg)
from gradsparse.metrics import eval_metrics
for _ in range(3):
    engine.step()
eval_metrics(engine, ["loss", "test_accuracy"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak, "estimate": need, "pre": None if pre is None else pre[0], "how": how}))
'''
LIN_S = {"name": "linreg", "options": {"n_samples": 10000, "n_features": 1000000, "feature_density": 0.001}}
LIN_S4 = {"name": "linreg", "options": {"n_samples": 20000, "n_features": 10000, "feature_density": 0.01}}
LIN_D = {"name": "linreg", "options": {"n_samples": 20000, "n_features": 1024}}
TOPK = {"compressor": {"kind": "topk", "density": 0.01}}
CASES = [
    ("sparse linreg d=1e6, 100 x 16", {"task": LIN_S, "workers": {"count": 100, "batch_size": 16}, "algorithm": TOPK}),
    ("sparse linreg d=1e6, 400 x 16", {"task": LIN_S, "workers": {"count": 400, "batch_size": 16}, "algorithm": TOPK}),
    ("sparse linreg d=1e4, 10000 x 1", {"task": LIN_S4, "workers": {"count": 10000, "batch_size": 1}, "algorithm": TOPK}),
    ("dense linreg d=1024, 100 x 16", {"task": LIN_D, "workers": {"count": 100, "batch_size": 16}, "algorithm": TOPK}),
    ("dense linreg d=1024, 1000 x 16", {"task": LIN_D, "workers": {"count": 1000, "batch_size": 16}, "algorithm": TOPK}),
    ("dense linreg d=1024, 10000 x 1", {"task": LIN_D, "workers": {"count": 10000, "batch_size": 1}, "algorithm": TOPK}),
    ("logreg gisette_like, 1000 x 1", {"task": {"name": "logreg", "options": {"dataset": "gisette_like"}}, "workers": {"count": 1000, "batch_size": 1}, "algorithm": TOPK}),
    ("logreg gisette_like, 100 x 1 hard-threshold ef-scaled", {"task": {"name": "logreg", "options": {"dataset": "gisette_like"}}, "workers": {"count": 100, "batch_size": 1}, "algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.01}, "feedback": "ef-scaled"}}),
    ("digits_mlp, 100 x 16", {"task": {"name": "digits_mlp"}, "workers": {"count": 100, "batch_size": 16}, "algorithm": TOPK}),
    ("digits_mlp, 1000 x 1", {"task": {"name": "digits_mlp"}, "workers": {"count": 1000, "batch_size": 1}, "algorithm": TOPK}),
    ("mnist5k_mlp, 1000 x 4", {"task": {"name": "mnist5k_mlp"}, "workers": {"count": 1000, "batch_size": 4}, "algorithm": TOPK}),
    ("mnist5k_mlp, 1000 x 4, ht ef-scaled momentum", {"task": {"name": "mnist5k_mlp"}, "workers": {"count": 1000, "batch_size": 4}, "algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.01}, "feedback": "ef-scaled", "momentum": {"kind": "update"}}}),
    ("mnist5k_mlp, 4000 x 1, identity none", {"task": {"name": "mnist5k_mlp"}, "workers": {"count": 4000, "batch_size": 1}, "algorithm": {"compressor": {"kind": "identity"}, "feedback": "none"}}),
    ("mnist5k_lenet, 100 x 64", {"task": {"name": "mnist5k_lenet"}, "workers": {"count": 100, "batch_size": 64}, "algorithm": TOPK}),
    ("mnist5k_cnn, 100 x 16", {"task": {"name": "mnist5k_cnn"}, "workers": {"count": 100, "batch_size": 16}, "algorithm": TOPK}),
    ("mnist5k_mlp loop, 200 x 4", {"engine": "loop", "task": {"name": "mnist5k_mlp"}, "workers": {"count": 200, "batch_size": 4}, "algorithm": TOPK}),
    ("mnist5k_mlp async, 1000 x 4", {"engine": "async", "task": {"name": "mnist5k_mlp"}, "workers": {"count": 1000, "batch_size": 4}, "algorithm": {**TOPK, "feedback": "memory", "topology": {"kind": "ps_uplink"}}}),
    ("toy float64, 3 x 200000", {"task": {"name": "toy_quadratic", "options": {"dtype": "float64"}}, "workers": {"count": 3, "batch_size": 200000}, "algorithm": {"compressor": {"kind": "topk", "k": 1}, "topology": {"kind": "ps_uplink"}}}),
]
only = sys.argv[1:]
for name, raw in CASES:
    if only and not any(o in name for o in only):
        continue
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode:
        print(json.dumps({"case": name, "error": p.stderr.strip().splitlines()[-1]}), flush=True)
        continue
    r = json.loads(p.stdout.strip().splitlines()[-1])
    G = 2**30
    print(json.dumps({"case": name, "peak_gib": round(r["peak"] / G, 3), "estimate_gib": round(r["estimate"] / G, 3),
                      "ratio": round(r["estimate"] / r["peak"], 2),
                      "before_task_gib": None if r["pre"] is None else round(r["pre"] / G, 3)}), flush=True)
