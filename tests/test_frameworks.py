"""The README's recipes for PyTorch Lightning and Hugging Face Accelerate, run as shipped
(examples/lightning_ddp.py, examples/accelerate_ddp.py) on 2 gloo processes under torchrun.

Each rank trains on its own shard with full batches and plain SGD, so the run must end at the
parameters of gradsparse's synchronous simulator running the same algorithm (layer-wise top-k
with error feedback, 2 workers owning those shards, full local batches): that holds only if the
framework really exchanged the gradients through gradsparse's hook (plain averaging ends
elsewhere). Skipped when the framework is not installed (``pip install 'gradsparse[frameworks]'``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import TopK
from gradsparse.engines import SyncSimulator
from gradsparse.schedules import Schedule
from gradsparse.segments import Layout
from gradsparse.tasks import task_from

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "src" / "gradsparse" / "examples"
STEPS, LR, DENSITY = 6, 0.5, 0.05


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(script: str, out: Path, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(EXAMPLES / script), "--steps", str(STEPS), "--lr", str(LR), "--density", str(DENSITY),
                           "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _simulated(example) -> SyncSimulator:
    """gradsparse's simulator on the example's model, shards, algorithm and step size."""
    shards = [example.make_data(rank) for rank in range(2)]
    x = torch.cat([s[0] for s in shards])
    y = torch.cat([s[1] for s in shards])
    task = task_from("framework_example", model=example.make_net(), train=(x, y))
    n = len(shards[0][0])
    task.worker_data = [torch.arange(n), torch.arange(n, 2 * n)]
    layout = Layout.of(task.init_params(None))
    alg = Algorithm(compressor=TopK(density=DENSITY, scope="layerwise", layout=layout), feedback="ef")
    sim = SyncSimulator(task, alg, Schedule(lr=LR), n_workers=2, batch_size="full", gradient_path="vmap")
    for _ in range(STEPS):
        sim.step()
    return sim


def _check(result: dict, sim: SyncSimulator) -> None:
    got = torch.cat([p.reshape(-1) for p in result["params"].values()])
    torch.testing.assert_close(got, sim.w, rtol=1e-5, atol=1e-6)
    assert result["step"] == STEPS  # the hook ran at every step
    assert 0 < result["counters"]["uplink_bytes"] < 0.2 * STEPS * 4 * sim.d  # sparse messages, not dense fp32


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lightning_recipe_equals_the_simulator(tmp_path):
    pytest.importorskip("pytorch_lightning", reason="pytorch-lightning is not installed (extra 'frameworks')")
    _torchrun("lightning_ddp.py", tmp_path)
    _check(torch.load(tmp_path / "result.pt", weights_only=True), _simulated(_example("lightning_ddp")))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_recipe_equals_the_simulator_and_logs_the_hooks_bytes(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (extra 'frameworks')")
    board = importlib.util.find_spec("tensorboard") is not None
    _torchrun("accelerate_ddp.py", tmp_path, *(["--tensorboard"] if board else []))
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    _check(result, _simulated(_example("accelerate_ddp")))
    if board:
        from gradsparse.experiments.tensorboard import read_scalars

        scalars = read_scalars(tmp_path / "tensorboard")
        cumulative = scalars["hook/uplink_bytes"]
        assert [s for s, _ in cumulative] == list(range(1, STEPS + 1))
        assert cumulative[-1][1] == result["counters"]["uplink_bytes"]
        per_step = [v for _, v in scalars["hook/uplink_bytes_per_step"]]
        assert sum(per_step) == pytest.approx(result["counters"]["uplink_bytes"])
