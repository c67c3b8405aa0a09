"""Shared test set-up: the ``multiprocess`` marker and the helpers several test files use.

Tests that start other processes (torchrun ranks, network namespaces, a killed run, parallel
reproductions) carry ``@pytest.mark.multiprocess``; tests that use a module fixture which
launches the ranks once for the whole module (``launched``, ``measured``) get it here. They are
most of the suite's time: ``pytest -m "not multiprocess"`` is the quick loop, the README's test
command (and CI) runs everything.

Helpers (import them with ``from conftest import ...``): :func:`write_config`,
:func:`patched`, :func:`read_csv`, :func:`wait_for`, :func:`launch_env` and
:func:`check_reproduction` (what every end-to-end reproduction test asserts of its output).
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

#: module fixtures that start processes for every test that uses them
PROCESS_FIXTURES = {"launched", "measured"}

SRC = Path(__file__).resolve().parents[1] / "src"


def pytest_collection_modifyitems(items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.multiprocess)


# ------------------------------------------------------------------------------------------------
# configs, files, processes
# ------------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, raw: dict, name: str = "c.yaml") -> Path:
    """``raw`` written as YAML to ``tmp_path/name``; returns the path."""
    p = Path(tmp_path) / name
    p.write_text(yaml.safe_dump(raw))
    return p


def patched(base: dict, **patch) -> dict:
    """A deep copy of config ``base`` with dotted keys set: ``patched(TOY, **{"schedule.lr": 0.1})``."""
    raw = json.loads(json.dumps(base))
    for k, v in patch.items():
        node = raw
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return raw


def read_csv(path) -> list[dict]:
    """The rows of a CSV file as dicts (values as text)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wait_for(pred, what: str, timeout: float = 120.0, poll: float = 0.05) -> None:
    """Poll ``pred()`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def launch_env(**extra: str) -> dict:
    """The environment for a ``gradsparse launch`` / torchrun child: one torch thread, gloo over
    the loopback interface, this checkout's ``src`` first on the path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "GRADSPARSE_BACKEND": "gloo",
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **extra}


# ------------------------------------------------------------------------------------------------
# end-to-end reproductions
# ------------------------------------------------------------------------------------------------

_TABLE_ROW = re.compile(r"^\| \*\*(?P<id>[^*]+)\*\* \| \*\*(?P<verdict>[^*]+)\*\* \|", re.M)
_HEADING = re.compile(r"^## (?P<id>.+): (?P<verdict>holds|does not hold|inconclusive)$", re.M)


def check_reproduction(rep, summary: dict, out: Path, seeds: int, *, scale: str = "small", again: bool = True,
                       count_runs: bool = True) -> None:
    """What the output of ``execute(rep, scale, seeds, out)`` must say, whatever the verdicts:

    - the claims are the reproduction's declared claims, in order (when it declares them);
    - ``summary.json`` on disk holds the returned claims and verdicts;
    - ``report.md`` shows each claim's verdict in its table row and its section heading, and no
      other claim; it shows every figure, and each figure is a drawn PNG;
    - ``summary["runs"]`` is the number :attr:`Reproduction.expected_runs` promises
      (``count_runs``), and
      ``runs/`` holds finished runs only (completed or diverged), at most that many (a run
      asked for twice with the same config is counted twice and stored once);
    - a claim with diverged runs is never "holds", and the runs it names exist;
    - ``again``: executing a second time into ``out`` reuses every run (no run directory is
      rewritten) and gives the same claims: the verdicts are a function of the stored runs.
    """
    out = Path(out)
    claims = summary["claims"]
    ids = [c["id"] for c in claims]
    assert summary["status"] == "completed" and ids
    if rep.claims:
        assert ids == [spec.id for spec in rep.claims]
    on_disk = json.loads((out / "summary.json").read_text())
    assert [(c["id"], c["verdict"]) for c in on_disk["claims"]] == [(c["id"], c["verdict"]) for c in claims]
    report = (out / "report.md").read_text()
    verdicts = {c["id"]: c["verdict"] for c in claims}
    assert {m["id"]: m["verdict"] for m in _TABLE_ROW.finditer(report)} == verdicts
    assert {m["id"]: m["verdict"] for m in _HEADING.finditer(report)} == verdicts
    for f in summary["figures"]:
        assert f"]({f})" in report
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / f).stat().st_size > 5_000, f
    run_dirs = sorted(p.parent for p in (out / "runs").glob("*/summary.json"))
    statuses = [json.loads((d / "summary.json").read_text())["status"] for d in run_dirs]
    assert set(statuses) <= {"completed", "diverged"}, statuses
    assert 1 <= len(run_dirs) <= summary["runs"]
    if count_runs and rep.expected_runs is not None:
        assert summary["runs"] == rep.expected_runs(scale, seeds)
    keys = {d.name for d in run_dirs}
    for c in claims:
        assert set(c["diverged"]) <= keys, c["diverged"]
        if c["diverged"]:
            assert c["verdict"] != "holds", c["id"]
    if again:
        from gradsparse.reproduce.base import execute

        written = {d.name: (d / "metrics.csv").stat().st_mtime_ns for d in run_dirs if (d / "metrics.csv").exists()}
        second = execute(rep, scale, seeds, out)
        assert {d: (out / "runs" / d / "metrics.csv").stat().st_mtime_ns for d in written} == written
        assert second["runs"] == summary["runs"]
        assert json.loads((out / "summary.json").read_text())["claims"] == on_disk["claims"]
