"""Tasks from the user's own code (``task.name: file.py:function`` or ``module:function``).

The task file of most tests is the one in README.md ("Your own model and data"), written to disk
as the README shows it: it runs on sync (grouped gradients: Linear layers only), loop and async
with the parameters those engines must share, and under ``gradsparse launch`` on torch and
torch_async. A task that does not load or has the wrong shape is one line, exit 2, nothing
written; ``gradsparse launch`` refuses everything the ranks would refuse before starting torchrun.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from gradsparse.cli import main
from gradsparse.config import load_config
from gradsparse.engines.async_sim import AsyncSimulator
from gradsparse.experiments.plots import read_metrics
from gradsparse.experiments.runner import run

from conftest import launch_env

ROOT = Path(__file__).resolve().parents[1]


def readme_task_source() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith("# my_task.py")]
    assert len(blocks) == 1, "README should show one '# my_task.py' block"
    return blocks[0]


@pytest.fixture
def readme_task(tmp_path) -> str:
    path = tmp_path / "my_task.py"
    path.write_text(readme_task_source())
    return f"{path}:make_task"


def base_config(task_name: str, **changes) -> dict:
    cfg = {
        "name": "user", "seed": 3, "task": {"name": task_name, "options": {"width": 16}},
        "workers": {"count": 3, "batch_size": 4},
        "algorithm": {"compressor": {"kind": "topk", "density": 0.05}, "feedback": "ef"},
        "schedule": {"lr": 0.2}, "steps": 6, "plots": False, "progress": False,
        "metrics": {"every": 3, "names": ["step", "loss", "test_accuracy", "uplink_bytes"]},
    }
    cfg.update(changes)
    return cfg


def _w(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["w"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_readme_task_runs_on_sync_grouped_vmap_and_loop_with_the_same_parameters(readme_task, tmp_path):
    cfg = base_config(readme_task)
    grouped = run(load_config(cfg), tmp_path / "sync", progress=False)
    vmapped = run(load_config({**cfg, "simulator": {"gradient_path": "vmap"}}), tmp_path / "vmap", progress=False)
    looped = run(load_config({**cfg, "engine": "loop"}), tmp_path / "loop", progress=False)
    # Linear layers only: the simulator's fast path applies to the user's module, as to built-in MLPs
    assert _summary(grouped)["gradient_path"] == "grouped" and _summary(vmapped)["gradient_path"] == "vmap"
    torch.testing.assert_close(_w(vmapped), _w(grouped), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_w(looped), _w(grouped), rtol=1e-5, atol=1e-6)
    assert _summary(grouped)["uplink_bytes"] == _summary(looped)["uplink_bytes"]
    assert _summary(grouped)["d"] == 20 * 16 + 16 + 16 * 2 + 2  # width 16 from task.options
    acc = read_metrics(grouped)["test_accuracy"]
    assert all(0.0 <= a <= 1.0 for a in acc)


def test_cnn_example_takes_vmap_and_loop_agrees(tmp_path):
    name = "gradsparse.examples.user_task_cnn:make_task"
    cfg = base_config(name, task={"name": name, "options": {"channels": 2}}, steps=4,
                      workers={"count": 2, "batch_size": 3})
    a = run(load_config(cfg), tmp_path / "sync", progress=False)
    b = run(load_config({**cfg, "engine": "loop"}), tmp_path / "loop", progress=False)
    assert _summary(a)["gradient_path"] == "vmap"  # convolutions: no grouped path
    assert _summary(a)["task"] == name  # a module name stays as written
    torch.testing.assert_close(_w(b), _w(a), rtol=1e-5, atol=1e-6)


def test_async_engine_runs_a_user_task_and_equals_sync_on_one_worker(readme_task, tmp_path):
    cfg = AsyncSimulator.synchronous_equivalent(base_config(readme_task, engine="async"))
    a = run(load_config(cfg), tmp_path / "async", progress=False)
    s = run(load_config({**cfg, "engine": "sync"}), tmp_path / "sync", progress=False)
    torch.testing.assert_close(_w(a), _w(s), rtol=1e-6, atol=1e-7)
    assert _summary(a)["staleness_histogram"] == {"0": 6}
    # several workers with delays: a real asynchronous run whose every update is counted once
    cfg = base_config(readme_task, engine="async", algorithm={"compressor": {"kind": "topk", "density": 0.05},
                                                             "feedback": "memory", "topology": {"kind": "ps_uplink"}})
    hist = _summary(run(load_config(cfg), tmp_path / "async3", progress=False))["staleness_histogram"]
    assert sum(hist.values()) == 6


def test_the_seed_fixes_model_and_data_and_file_paths_become_absolute(readme_task, tmp_path, monkeypatch):
    from gradsparse.tasks import make_task

    t1, t2, t3 = (make_task(readme_task, seed=s, width=8) for s in (0, 0, 1))
    p1, p2, p3 = (t.init_params(None) for t in (t1, t2, t3))
    assert all(torch.equal(p1[n], p2[n]) for n in p1) and torch.equal(t1.train_x, t2.train_x)
    assert not torch.equal(p1["0.weight"], p3["0.weight"]) and not torch.equal(t1.train_x, t3.train_x)
    # the global generator is restored: building a task does not shift the caller's random stream
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    make_task(readme_task, seed=5)
    assert torch.equal(torch.rand(3), want)
    # a relative file path is resolved against the current directory into the resolved config
    monkeypatch.chdir(tmp_path)
    cfg = load_config(base_config("my_task.py:make_task"))
    assert cfg.task.name == f"{tmp_path / 'my_task.py'}:make_task"


def test_module_form_imports_from_the_current_directory(tmp_path, monkeypatch):
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(readme_task_source())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    out = run(load_config(base_config("my_pkg.tasks:make_task", steps=2)), tmp_path / "r", progress=False)
    assert _summary(out)["task"] == "my_pkg.tasks:make_task" and str(tmp_path) not in sys.path
    sys.modules.pop("my_pkg.tasks", None)
    sys.modules.pop("my_pkg", None)


FUNCTIONAL = '''
import torch

def make_task(*, seed, n=64, d=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    w_star = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    def loss(p, xb, yb):
        return 0.5 * ((xb @ p["w"] - yb) ** 2).mean()
    L = float(torch.linalg.eigvalsh(x.T @ x / n).max())
    return {"params": {"w": torch.zeros(d, dtype=torch.float64)}, "loss": loss, "train": (x, y),
            "f_star": float(loss({"w": w_star}, x, y)), "info": {"L": L}}
'''


def test_functional_form_with_f_star_and_one_over_L(tmp_path):
    path = tmp_path / "lsq.py"
    path.write_text(FUNCTIONAL)
    cfg = base_config(f"{path}:make_task", task={"name": f"{path}:make_task", "options": {}},
                      workers={"count": 2, "batch_size": "full"}, schedule={"lr": "1/L"}, steps=300,
                      algorithm={"compressor": {"kind": "topk", "k": 2}, "feedback": "ef"},
                      metrics={"every": 100, "names": ["step", "loss", "suboptimality"]})
    out = run(load_config(cfg), tmp_path / "r", progress=False)
    m = read_metrics(out)
    # suboptimality = loss - f*, and full-batch top-k with error feedback at 1/L converges to f*
    f_star = _summary(out)["f_star"]
    assert all(abs(s - (l - f_star)) < 1e-12 for s, l in zip(m["suboptimality"], m["loss"]))
    assert m["suboptimality"][0] > 0.1 and 0 <= m["suboptimality"][-1] < 1e-3 * m["suboptimality"][0]


def test_a_dataset_of_pairs_is_read_into_tensors(tmp_path):
    path = tmp_path / "ds.py"
    path.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        class Pairs(torch.utils.data.Dataset):
            def __len__(self): return 10
            def __getitem__(self, i): return torch.full((3,), float(i)), i % 2
        def make_task(seed):
            return {"model": nn.Linear(3, 2), "train": Pairs()}
    '''))
    from gradsparse.tasks import make_task

    task = make_task(f"{path}:make_task", seed=0)
    assert task.train_x.shape == (10, 3) and task.train_y.tolist() == [i % 2 for i in range(10)]
    assert task.predict is not None and task.test_x is None  # integer targets: accuracy on train


BAD = '''
import torch
from torch import nn

RAISE_AT_IMPORT = False
if RAISE_AT_IMPORT:
    raise RuntimeError("x")

def xy(n=6, d=3):
    return torch.zeros(n, d), torch.zeros(n, dtype=torch.long)

def not_a_dict(seed):
    return [1, 2]

def unknown_key(seed):
    return {"model": nn.Linear(3, 2), "train": xy(), "validation": xy()}

def both(seed):
    return {"model": nn.Linear(3, 2), "params": {"w": torch.zeros(3)}, "train": xy()}

def unequal(seed):
    return {"model": nn.Linear(3, 2), "train": (torch.zeros(6, 3), torch.zeros(5, dtype=torch.long))}

def wrong_input(seed):
    return {"model": nn.Linear(4, 2), "train": xy()}

def dropout(seed):
    return {"model": nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)), "train": xy()}

def batchnorm(seed):
    return {"model": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), "train": xy()}

def calls_item(seed):
    def loss(p, x, y):
        return (x @ p["w"]).sum() * 0 if float((x @ p["w"]).sum().item()) > 1 else (x @ p["w"] - y).pow(2).mean()
    return {"params": {"w": torch.zeros(3)}, "loss": loss, "train": (torch.randn(6, 3), torch.randn(6))}

def vector_loss(seed):
    return {"model": nn.Linear(3, 2), "train": xy(), "loss": lambda out, y: (out ** 2).mean(dim=1)}

def mixed_dtypes(seed):
    return {"params": {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)},
            "loss": lambda p, x, y: (p["a"].sum() + p["b"].sum()).float(), "train": xy()}

def raises(seed, width=3):
    raise KeyError("no such column")
'''


@pytest.mark.parametrize("function, options, needle", [
    ("nope", {}, "has no function 'nope' (it defines: batchnorm, both, calls_item"),
    ("not_a_dict", {}, "returned list; expected a dict with keys model, params"),
    ("unknown_key", {}, "returned unknown key 'validation'; allowed keys: model, params"),
    ("both", {}, "give exactly one of 'model' (an nn.Module) or 'params'"),
    ("unequal", {}, "train has 6 inputs but 5 targets"),
    ("wrong_input", {}, "the loss on 2 training rows failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ("dropout", {}, "cannot train layer 1 (Dropout"),
    ("batchnorm", {}, "cannot train layer 1 (BatchNorm1d with running statistics"),
    ("calls_item", {}, "cannot be differentiated per worker with torch.func.vmap(grad(loss))"),
    ("vector_loss", {}, "the loss must return a floating scalar (the mean over the batch), got a tensor of shape (2,)"),
    ("mixed_dtypes", {}, "the parameters must share one dtype, float32 or float64 (a: float32, b: float64)"),
    ("raises", {}, "raised at bad.py:"),
    ("raises", {"depth": 2}, "has no option(s) ['depth']; its function takes: width"),
])
def test_a_bad_task_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, function, options, needle):
    (tmp_path / "bad.py").write_text(BAD)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(f"{tmp_path / 'bad.py'}:{function}",
                                              task={"name": f"{tmp_path / 'bad.py'}:{function}", "options": options})))
    out = tmp_path / "runs" / "x"
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradsparse: error: config key 'task.name': task ") and needle in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, needle", [
    ("missing.py:make_task", "missing.py' does not exist"),
    ("broken.py:make_task", "importing"),
    ("raising.py:make_task", "failed at raising.py:3: ZeroDivisionError: division by zero"),
    ("no_such_pkg_xyz.mod:make_task", "no module named 'no_such_pkg_xyz'"),
    ("bad.py:1st", "'1st' after the colon is not a Python function name"),
    ("not_a_task", "unknown task 'not_a_task'; allowed: digits_cnn"),
])
def test_a_task_that_does_not_import_is_one_line(tmp_path, capsys, monkeypatch, name, needle):
    (tmp_path / "broken.py").write_text("def make_task(seed:\n")
    (tmp_path / "raising.py").write_text("import torch\n\nx = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "toy_uplink", "--set", f"task.name={name}", "--set", "task.options={}",
                 "--out", str(tmp_path / "runs" / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradsparse: error:") and needle in err[0], err
    if name == "broken.py:make_task":
        assert "SyntaxError" in err[0] and "line 1" in err[0]
    assert not (tmp_path / "runs").exists()


def test_sweep_checks_the_task_before_writing(tmp_path, capsys):
    (tmp_path / "bad.py").write_text(BAD)
    out = tmp_path / "sweep"
    code = main(["sweep", "toy_uplink", "--set", f"task.name={tmp_path / 'bad.py'}:unequal", "--set", "task.options={}",
                 "--grid", "seed=0,1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train has 6 inputs but 5 targets" in err[0]
    assert not out.exists()


# ---- gradsparse launch ---------------------------------------------------------------------------------


def _env() -> dict:
    return launch_env()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_user_task_under_launch_on_torch_and_torch_async(readme_task, tmp_path):
    """One torchrun of 2 processes runs two configs: engine torch (2 workers, every rank runs the
    server step) equals sync; engine async (1 worker + rank 0 serving: torch_async) equals the
    asynchronous simulator bitwise."""
    try:
        import tensorboard  # noqa: F401

        board = True
    except ImportError:
        board = False
    sync_cfg = base_config(readme_task, workers={"count": 2, "batch_size": 4},
                           metrics={"every": 3, "names": ["step", "loss", "test_accuracy", "uplink_bytes"],
                                    "tensorboard": board})
    async_cfg = base_config(readme_task, engine="async", workers={"count": 1, "batch_size": 4},
                            algorithm={"compressor": {"kind": "topk", "density": 0.05}, "feedback": "memory",
                                       "topology": {"kind": "ps_uplink"}})
    paths = []
    for name, cfg in (("dist", sync_cfg), ("asyn", async_cfg)):
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        paths.append(str(p))
    proc = subprocess.run([sys.executable, "-m", "gradsparse.cli", "launch", *paths, "--nproc", "2",
                           "--out", str(tmp_path / "runs")], env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got_dist, got_async = tmp_path / "runs" / "dist", tmp_path / "runs" / "asyn"
    assert _summary(got_dist)["engine"] == "torch" and _summary(got_async)["engine"] == "torch_async"
    assert _summary(got_dist)["task"] == readme_task
    ref_dist = run(load_config(sync_cfg), tmp_path / "ref_dist", progress=False)
    ref_async = run(load_config(async_cfg), tmp_path / "ref_async", progress=False)
    torch.testing.assert_close(_w(got_dist), _w(ref_dist), rtol=1e-5, atol=1e-6)
    assert _summary(got_dist)["uplink_bytes"] == _summary(ref_dist)["uplink_bytes"]
    assert torch.equal(_w(got_async), _w(ref_async))
    if board:  # rank 0 wrote the event files; the other rank's are not kept
        from gradsparse.experiments.tensorboard import read_scalars

        losses = read_scalars(got_dist)["loss/by_step"]
        assert [s for s, _ in losses] == [0, 3, 6]


REFUSALS = [
    # (config changes, nproc, what the line says)
    ({"task": {"name": "no_such_task"}}, 3, "unknown task 'no_such_task'"),
    ({"task": {"name": "BAD:unequal", "options": {}}}, 3, "train has 6 inputs but 5 targets"),
    ({"workers": {"count": 3, "batch_size": "full"}}, 2, "--nproc 3 or 4"),
    ({"schedule": {"kind": "stagewise", "stage_steps": [4], "lr": 0.01}}, 4,
     "engine 'torch' with a parameter server (rank 0 serving, --nproc 4) does not run stagewise learning"),
    ({"engine": "async", "asynchronous": {"staleness_bound": 2}}, 4, "engine 'torch_async' does not run staleness_bound"),
    ({"engine": "async", "asynchronous": {"kardam": {"enabled": True, "rejected": "restore"}}}, 4,
     "engine 'torch_async' runs Kardam's filter with rejected: drop only"),
    ({"engine": "async", "asynchronous": {"update_cosine": True}}, 4,
     "engine 'torch_async' does not record update_cosine"),
    ({"engine": "async", "metrics": {"names": ["step", "xi"]}}, 4, "engine 'torch_async' does not record ['xi']"),
    ({"algorithm": {"compressor": {"kind": "topk", "k": 500}, "topology": {"kind": "ps_uplink"}}}, 3,
     "k = 500 exceeds the vector size d = 100"),
]


def _toy(tmp_path: Path, changes: dict) -> Path:
    cfg = {"name": "toy", "task": {"name": "toy_quadratic", "options": {"dtype": "float64"}},
           "workers": {"count": 3, "batch_size": "full"}, "steps": 8, "plots": False,
           "algorithm": {"compressor": {"kind": "topk", "k": 1}, "topology": {"kind": "ps_uplink"}}}
    cfg.update(changes)
    if cfg.get("engine") == "async":
        cfg["algorithm"] = {"compressor": {"kind": "topk", "k": 1}, "feedback": "memory", "topology": {"kind": "ps_uplink"}}
    if cfg["task"]["name"].startswith("BAD:"):
        (tmp_path / "bad.py").write_text(BAD)
        cfg["task"] = {**cfg["task"], "name": f"{tmp_path / 'bad.py'}:{cfg['task']['name'][4:]}"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("changes, nproc, needle", REFUSALS)
def test_launch_refuses_before_torchrun_starts(tmp_path, capsys, monkeypatch, changes, nproc, needle):
    import gradsparse.distributed.launch as launch

    started = []
    monkeypatch.setattr(launch, "run_torchrun", lambda cmd, env: started.append(cmd) or 0)
    path = _toy(tmp_path, changes)
    assert launch.main([str(path), "--nproc", str(nproc), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradsparse: error:") and needle in err[0], err
    assert started == [] and not (tmp_path / "out").exists()


def test_launch_starts_torchrun_when_nothing_is_refused(tmp_path, monkeypatch):
    """The same configs with the refused setting removed do reach torchrun (the refusals above
    are the settings', not the test configs')."""
    import gradsparse.distributed.launch as launch

    started = []
    monkeypatch.setattr(launch, "run_torchrun", lambda cmd, env: started.append(cmd) or 0)
    for changes, nproc in (({}, 4), ({"schedule": {"kind": "stagewise", "stage_steps": [4], "lr": 0.01}}, 3),
                           ({"engine": "async", "asynchronous": {"drop_older_than": 2}}, 4)):
        assert launch.main([str(_toy(tmp_path, changes)), "--nproc", str(nproc), "--out", str(tmp_path / "o")]) == 0
    assert len(started) == 3


def test_torch_async_refusals_match_the_engine():
    """launch's copy of torch_async's constructor rules refuses exactly what the engine refuses
    (the engine checks them before it needs a process group)."""
    from gradsparse.distributed.launch import torch_async_refusal
    from gradsparse.engines.async_sim import KardamFilter
    from gradsparse.engines.torch_async import TorchAsyncEngine

    cases = [{"staleness_bound": 1}, {"kardam": KardamFilter(enabled=True, rejected="restore")}, {"update_cosine": True}]
    for kw in cases:
        why = torch_async_refusal(kw)
        with pytest.raises(ValueError) as exc:
            TorchAsyncEngine(None, None, None, **kw)
        assert why is not None and str(exc.value) == why
    assert torch_async_refusal({"kardam": KardamFilter(enabled=True, rejected="drop"), "staleness_bound": None}) is None


@pytest.mark.multiprocess
def test_a_refused_launch_leaves_no_process(tmp_path):
    """As a user runs it: a separate process group, one line, exit 2, and nothing of it left."""
    path = _toy(tmp_path, {"engine": "async", "asynchronous": {"staleness_bound": 2}})
    proc = subprocess.Popen([sys.executable, "-m", "gradsparse.cli", "launch", str(path), "--nproc", "4", "--out",
                             str(tmp_path / "out")], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not run staleness_bound" in lines[0]
    left = subprocess.run(["ps", "-o", "pid=", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the refused launch still run: {left}"
    assert not (tmp_path / "out").exists()
