"""The machinery every paper reproduction shares: runs, claims, verdicts, reports.

A reproduction is a :class:`Reproduction`: a name (``zou-toy``), the paper it comes from, and a
``run(ctx)`` that launches its training runs through ``ctx.run_many`` and returns its
:class:`Claim` s. Each claim carries the paper's statement and numbers, the measured figures, the
rule that decided it, and a verdict computed from the measurements by that rule:

    "holds"          the measurements satisfy the rule;
    "does not hold"  they contradict it (an honest result; the report says what was seen);
    "inconclusive"   neither (e.g. the ordering flips between seeds, or a run diverged).

Written to ``OUT/NAME/``: ``runs/KEY/`` (one run directory per training run, reused when a
completed run with the same config is already there), the figures, ``report.md`` (a table of
the measured numbers beside the paper's statement and numbers, the number of seeds and the
spread) and ``summary.json`` (per claim: verdict, measured, rule).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

VERDICTS = ("holds", "does not hold", "inconclusive")
SCALES = ("small", "full")


class DataMissing(Exception):
    """A ``full`` reproduction whose data files are not on disk; the message lists them and the
    download command."""


# ------------------------------------------------------------------------------------------------
# claims and the rules that decide them
# ------------------------------------------------------------------------------------------------


@dataclass
class Claim:
    """One claim of a paper, judged on our measurements.

    ``statement``: the claim in our words; ``paper``: the paper's own statement and numbers;
    ``measured``: the figures we measured (plain numbers, strings, lists); ``rule``: the rule, in
    words, that turned ``measured`` into ``verdict``; ``explanation``: optional, what was seen
    when the claim does not hold or is inconclusive. ``reads``: the measurements the rule reads;
    ``margin``: by how much each of the rule's tests passed or failed (the closest case);
    ``agreed``: how many seeds (or settings) satisfied the rule; ``falsified_by``: the broken
    experiment or violating measurements on which the tests check that the rule does not say
    "holds"; ``diverged``: runs that ended worse than they started (they never support a claim)."""

    id: str
    statement: str
    paper: str
    measured: dict[str, Any]
    rule: str
    verdict: str
    explanation: str = ""
    reads: tuple[str, ...] = ()
    margin: str = ""
    agreed: str = ""
    falsified_by: str = ""
    diverged: tuple[str, ...] = ()

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"claim {self.id!r}: verdict {self.verdict!r} is not one of {VERDICTS}")

    def to_dict(self) -> dict:
        return {"id": self.id, "statement": self.statement, "paper": self.paper, "verdict": self.verdict,
                "rule": self.rule, "reads": list(self.reads), "margin": self.margin, "agreed": self.agreed,
                "measured": self.measured, "explanation": self.explanation, "falsified_by": self.falsified_by,
                "diverged": list(self.diverged)}


@dataclass(frozen=True)
class ClaimSpec:
    """A claim as data, fixed before any run: its ``id``, our ``statement`` of it, the paper's
    statement and numbers (``paper``), the ``rule`` that decides it, the measurements the rule
    ``reads``, and what ``falsified_by`` -- the deliberately broken experiment or the measurements
    violating the paper's statement on which a test checks that the rule does not say "holds".

    :meth:`judge` turns a verdict computed by the rule into a :class:`Claim`. A claim that a
    diverged run (one that ended worse than its start) would support is never "holds": its
    verdict is lowered to "inconclusive" and the explanation says which runs diverged."""

    id: str
    statement: str
    paper: str
    rule: str
    reads: tuple[str, ...]
    falsified_by: str

    def judge(self, verdict: str, measured: dict[str, Any], *, margin: str = "", agreed: str = "",
              explanation: str = "", diverged: Sequence[str] = ()) -> Claim:
        diverged = tuple(diverged)
        if diverged:
            note = (f"{len(diverged)} run(s) ended worse than they started (diverged): {', '.join(diverged)}; "
                    "a diverged run never supports a claim.")
            if verdict == "holds":
                verdict = "inconclusive"
            explanation = (note + " " + explanation).strip()
        return Claim(self.id, self.statement, self.paper, measured, self.rule, verdict, explanation, reads=self.reads,
                     margin=margin, agreed=agreed, falsified_by=self.falsified_by, diverged=diverged)


def verdict_of(holds: bool, contradicted: bool) -> str:
    """"holds" when ``holds``, "does not hold" when ``contradicted`` (and not ``holds``), else
    "inconclusive"."""
    if holds:
        return "holds"
    return "does not hold" if contradicted else "inconclusive"


def threshold_verdict(value: float | None, bound: float, *, below: bool = True, margin: float = 0.0) -> str:
    """Is ``value`` below (``below=True``) or above ``bound``?  "holds" when it is, "does not
    hold" when it is on the wrong side by more than ``margin`` (relative to |bound|),
    "inconclusive" in between or when the value is missing or not finite."""
    if value is None or not math.isfinite(value):
        return "inconclusive"
    slack = margin * abs(bound)
    if below:
        return verdict_of(value <= bound, value > bound + slack)
    return verdict_of(value >= bound, value < bound - slack)


def paired_outcomes(better: Sequence[float | None], worse: Sequence[float | None], *,
                    lower_is_better: bool = True) -> list[bool | None]:
    """Per seed: True when method A (``better``) strictly beats method B (``worse``), False when
    it does not (a tie is not a win), None when there is no comparison (a value missing or nan,
    or both +inf: neither reached its target)."""
    if len(better) != len(worse) or not better:
        raise ValueError(f"paired comparison needs equal, non-empty lists; got {len(better)} and {len(worse)}")
    sign = 1.0 if lower_is_better else -1.0
    out: list[bool | None] = []
    for a, b in zip(better, worse):
        if a is None or b is None or math.isnan(a) or math.isnan(b) or (math.isinf(a) and a == b):
            out.append(None)
        else:
            out.append(a != b and sign * (a - b) < 0)
    return out


def paired_verdict(better: Sequence[float | None], worse: Sequence[float | None], *,
                   lower_is_better: bool = True) -> str:
    """Is method A (``better``) better than method B (``worse``) on every seed?  Values are
    paired by seed. "holds" when A beats B on every seed, "does not hold" when B beats or ties
    A on every seed, "inconclusive" when the seeds disagree or a value is missing / not finite
    (a run that never reached its target counts as +inf when lower is better, which is a
    valid comparison against one that did; two that both never did are no comparison)."""
    try:
        outcomes = paired_outcomes(better, worse, lower_is_better=lower_is_better)
    except ValueError as exc:
        raise ValueError(f"paired_verdict needs equal, non-empty lists; got {len(better)} and {len(worse)}") from exc
    if any(o is None for o in outcomes):
        return "inconclusive"
    return verdict_of(all(outcomes), not any(outcomes))


def all_verdicts(verdicts: Iterable[str]) -> str:
    """Combine sub-verdicts: "holds" when all hold, "does not hold" when any does not hold,
    else "inconclusive"."""
    vs = list(verdicts)
    if vs and all(v == "holds" for v in vs):
        return "holds"
    return "does not hold" if "does not hold" in vs else "inconclusive"


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (nan, nan when none; std 0 for
    one value)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(value: Any, digits: int = 4) -> str:
    """A number in ``digits`` significant digits (lists and ± pairs too), for reports."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int,)) and abs(value) < 10 ** 9:
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v, digits)}" for k, v in value.items())
    return str(value)


def fmt_mean_std(values: Sequence[float | None], digits: int = 4) -> str:
    m, s = mean_std(values)
    return f"{fmt(m, digits)} ± {fmt(s, 2)}"


# ------------------------------------------------------------------------------------------------
# margins, agreement, divergence, equal volumes
# ------------------------------------------------------------------------------------------------


def slack(value: float | None, bound: float, *, below: bool = True) -> float:
    """How far ``value`` lies on the passing side of ``bound``, relative to |bound|: +0.2 means
    it passed with 20% to spare, -0.1 that it missed by 10% (``below``: the rule wants value <=
    bound; else value >= bound). -inf for a missing or non-finite value."""
    if value is None or not math.isfinite(value):
        return -math.inf
    if bound == 0:
        diff = -value if below else value
        return math.inf if diff > 0 else (0.0 if diff == 0 else -math.inf)
    return ((bound - value) if below else (value - bound)) / abs(bound)


def margin_text(name: str, value: float | None, bound: float, *, below: bool = True) -> str:
    """``name value vs <= bound (+20%)``: one test of a rule and the slack by which it passed."""
    sl = slack(value, bound, below=below)
    pct = "n/a" if not math.isfinite(sl) else f"{sl:+.0%}"
    return f"{name} {fmt(value, 3)} vs {'≤' if below else '≥'} {fmt(bound, 3)} ({pct})"


def worst(values: Sequence[float | None], *, largest: bool = True) -> float:
    """The worst case of per-seed values for a rule: the largest for an upper bound (``largest``),
    else the smallest; a missing or nan value counts as the worst of all (+-inf)."""
    bad = math.inf if largest else -math.inf
    xs = [bad if (v is None or math.isnan(v)) else float(v) for v in values]
    if not xs:
        return math.nan
    return max(xs) if largest else min(xs)


def agreement(flags: Sequence[bool], unit: str = "seeds") -> str:
    """"k/n seeds": how many of the per-seed (or per-setting) tests passed."""
    return f"{sum(bool(f) for f in flags)}/{len(flags)} {unit}"


def ended_worse(run: "RunResult", metric: str, *, higher_is_better: bool = False) -> bool:
    """A run that diverged (status "diverged", a non-finite final value) or whose last logged
    ``metric`` is worse than its first (step 0): it ended worse than it started."""
    if run.status == "diverged":
        return True
    raw = run.metrics.get(metric, [])
    if raw and not math.isfinite(raw[-1]):
        return True
    _, ys = run.series("step", metric)
    if not ys:
        return False
    first, last = ys[0], ys[-1]
    if not math.isfinite(last):
        return True
    return last < first if higher_is_better else last > first


def diverged_runs(runs: Iterable["RunResult"], metric: str, *, higher_is_better: bool = False) -> list[str]:
    """The keys of ``runs`` that ended worse than they started (see :func:`ended_worse`)."""
    return [r.key for r in runs if ended_worse(r, metric, higher_is_better=higher_is_better)]


VOLUME_TOLERANCE = 0.05  #: equal-volume comparisons need volumes within 5% of each other


def volume_gap(a: float, b: float) -> float:
    """|a - b| / max(a, b): the relative gap between two data volumes (0 when equal)."""
    top = max(abs(a), abs(b))
    return abs(a - b) / top if top > 0 else 0.0


def volumes_matched(a: Sequence[float], b: Sequence[float], tolerance: float = VOLUME_TOLERANCE) -> list[bool]:
    """Per seed: are the two volumes within ``tolerance`` of each other (relative gap)?"""
    return [math.isfinite(x) and math.isfinite(y) and volume_gap(x, y) <= tolerance for x, y in zip(a, b)]


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------


def deep_update(base: dict, updates: dict) -> dict:
    """A copy of ``base`` with ``updates`` merged in, section by section (a value that is a
    dict merges into the dict it replaces; anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def example_config(name: str) -> dict:
    """A shipped example config (``gradsparse examples``) as a dict."""
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no shipped example {name!r}")
    return yaml.safe_load(path.read_text())


@dataclass
class RunResult:
    """A finished run: its directory, ``summary.json`` as a dict, and its metric columns
    (``metrics["loss"]`` is the list of logged values; missing entries are nan)."""

    key: str
    dir: Path
    config: dict
    summary: dict
    metrics: dict[str, list[float]]

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def final(self, name: str) -> float | None:
        """The last logged value of metric ``name`` (None when never logged)."""
        v = self.summary.get("final", {}).get(name)
        return None if v is None else float(v)

    def series(self, x: str, y: str) -> tuple[list[float], list[float]]:
        """(x, y) logged values of two metrics, rows where either is missing left out."""
        xs, ys = self.metrics.get(x, []), self.metrics.get(y, [])
        pts = [(a, b) for a, b in zip(xs, ys) if not (math.isnan(a) or math.isnan(b))]
        return [p[0] for p in pts], [p[1] for p in pts]


_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


def _execute_run(cfg: dict, run_dir: str, threads: int) -> str:
    """Run one config into ``run_dir`` (in a worker process or in-line). A diverged run still
    leaves its directory (status "diverged"), which the reproduction judges."""
    import torch

    torch.set_num_threads(threads)
    from ..config import load_config
    from ..experiments.errors import RunDiverged
    from ..experiments.runner import run

    try:
        run(load_config(cfg), run_dir, progress=False, overwrite=True)
    except RunDiverged:
        pass
    return run_dir


def _load_result(key: str, run_dir: Path, cfg: dict) -> RunResult:
    from ..experiments.plots import read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else {}
    return RunResult(key, run_dir, cfg, summary, metrics)


@dataclass
class Context:
    """What a reproduction sees: its scale, seeds, output folder, and ``run_many``.

    ``processes`` > 1 runs the runs of one ``run_many`` call in parallel worker processes, one
    torch thread each. ``on_run`` is called once per finished run (the overall progress bar)."""

    name: str
    scale: str
    seeds: list[int]
    out: Path
    processes: int = 1
    on_run: Callable[[str], None] | None = None
    #: distinct runs finished or reused (a key asked for again, e.g. the threshold a search
    #: settled on, is one run)
    runs_done: int = 0
    _counted: set = field(default_factory=set)
    figures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def small(self) -> bool:
        return self.scale == "small"

    def run_many(self, configs: dict[str, dict]) -> dict[str, RunResult]:
        """Run each config (a dict as in a YAML config) into ``runs/KEY``; returns key -> result.

        A run directory already holding a completed (or diverged) run of the same config is
        reused, so an interrupted reproduction picks up where it stopped. Keys must be
        file-name safe (letters, digits, ``_ . = + -``)."""
        todo, results = [], {}
        for key, cfg in configs.items():
            if not _KEY.match(key):
                raise ValueError(f"run key {key!r} must match {_KEY.pattern}")
            cfg = deep_update(cfg, {"name": key, "progress": False})
            run_dir = self.out / "runs" / key
            if self._reusable(run_dir, cfg):
                results[key] = _load_result(key, run_dir, cfg)
                self._finished(key)
            else:
                todo.append((key, cfg, run_dir))
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        if self.processes > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=min(self.processes, len(todo))) as pool:
                futures = {pool.submit(_execute_run, cfg, str(d), 1): (key, cfg, d) for key, cfg, d in todo}
                for fut in futures:
                    key, cfg, d = futures[fut]
                    fut.result()
                    results[key] = self._store(key, cfg, d)
        else:
            for key, cfg, d in todo:
                _execute_run(cfg, str(d), 1)
                results[key] = self._store(key, cfg, d)
        return {key: results[key] for key in configs}

    def _reusable(self, run_dir: Path, cfg: dict) -> bool:
        spec = run_dir / "reproduce-config.json"
        if not (spec.is_file() and (run_dir / "summary.json").is_file()):
            return False
        try:
            same = json.loads(spec.read_text()) == json.loads(json.dumps(cfg))
            status = json.loads((run_dir / "summary.json").read_text()).get("status")
        except (OSError, ValueError):
            return False
        return same and status in ("completed", "diverged")

    def _store(self, key: str, cfg: dict, run_dir: Path) -> RunResult:
        (run_dir / "reproduce-config.json").write_text(json.dumps(cfg, indent=1))
        self._finished(key)
        return _load_result(key, run_dir, cfg)

    def _finished(self, key: str) -> None:
        if key in self._counted:
            return
        self._counted.add(key)
        self.runs_done += 1
        if self.on_run is not None:
            self.on_run(key)

    def figure(self, fig, filename: str, caption: str) -> Path:
        """Save a matplotlib figure as ``OUT/NAME/filename`` and list it in the report."""
        import matplotlib.pyplot as plt

        path = self.out / filename
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.figures.append((filename, caption))
        return path

    def note(self, text: str) -> None:
        """A paragraph for the report (settings that differ from the paper's, and why)."""
        self.notes.append(text)


@dataclass
class Reproduction:
    """One experiment group of EXPERIMENTS.md.

    ``run(ctx) -> list[Claim]`` does the work. ``full_data`` names the data sets the ``full``
    scale needs (checked before anything runs); ``settings`` describes, per scale, what is run,
    for the report and ``--list``. ``claims`` are the claims it judges, as data (a run must
    return exactly these, in this order); ``seeds`` is the number of seeds it runs when the
    command line does not say (5 where a verdict rests on an ordering over seeds); ``cpu_minutes``
    the CPU time it took per scale (for scheduling ``reproduce all``)."""

    name: str
    paper: str
    title: str
    run: Callable[[Context], list[Claim]]
    settings: dict[str, str]
    full_data: tuple[str, ...] = ()
    expected_runs: Callable[[str, int], int] | None = None
    claims: tuple[ClaimSpec, ...] = ()
    seeds: int = 3
    #: measured CPU minutes per scale at the default seeds (``reproduce all`` starts the longest first)
    cpu_minutes: dict[str, float] = field(default_factory=dict)


def missing_data(names: Sequence[str], data_dir: str | os.PathLike | None = None) -> list[str]:
    """Human-readable lines, one per data set of ``names`` whose files are not on disk."""
    from .. import datasets

    lines = []
    for n in names:
        missing = datasets.missing(n, data_dir)
        if missing:
            lines.append(f"{n}: missing {', '.join(missing)} (get it with: gradsparse data download {n})")
    return lines


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished child processes (the worker
    processes of ``run_many``), in seconds."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def execute(rep: Reproduction, scale: str, seeds: int | None, out: Path, *, processes: int = 1,
            on_run: Callable[[str], None] | None = None) -> dict:
    """Run reproduction ``rep`` into ``out`` and write its report; returns its summary dict.
    ``seeds`` None: the reproduction's own default (:attr:`Reproduction.seeds`)."""
    if seeds is None:
        seeds = rep.seeds
    if scale not in SCALES:
        raise ValueError(f"--scale {scale!r}; allowed: {list(SCALES)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if scale == "full":
        missing = missing_data(rep.full_data)
        if missing:
            summary = {"name": rep.name, "paper": rep.paper, "scale": scale, "status": "missing data",
                       "missing": missing, "claims": []}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            (out / "report.md").write_text(
                f"# {rep.name}: {rep.title}\n\nNot run at scale full: the data is not on disk.\n\n"
                + "".join(f"- {m}\n" for m in missing))
            raise DataMissing(f"{rep.name} --scale full needs data that is not on disk:\n  " + "\n  ".join(missing))
    ctx = Context(rep.name, scale, list(range(seeds)), out, processes=processes, on_run=on_run)
    start = time.perf_counter()
    cpu0 = cpu_seconds()
    claims = rep.run(ctx)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    if rep.claims and [c.id for c in claims] != [c.id for c in rep.claims]:
        raise RuntimeError(f"{rep.name} returned claims {[c.id for c in claims]}, declared {[c.id for c in rep.claims]}")
    summary = {
        "name": rep.name,
        "paper": rep.paper,
        "title": rep.title,
        "scale": scale,
        "seeds": seeds,
        "status": "completed",
        "settings": rep.settings.get(scale, ""),
        "runs": ctx.runs_done,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "claims": [c.to_dict() for c in claims],
        "figures": [f for f, _ in ctx.figures],
    }
    from ..experiments.outputs import strict_json

    (out / "summary.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
    (out / "report.md").write_text(report_markdown(rep, ctx, claims, wall, cpu))
    return summary


def report_markdown(rep: Reproduction, ctx: Context, claims: list[Claim], wall: float, cpu: float | None = None) -> str:
    cpu_text = "" if cpu is None else f", {cpu:.0f} s CPU (user + system)"
    lines = [f"# {rep.name}: {rep.title}", "",
             f"Paper {rep.paper}. Scale **{ctx.scale}**, {len(ctx.seeds)} seed(s) "
             f"({', '.join(map(str, ctx.seeds))}); {ctx.runs_done} runs in {wall:.0f} s{cpu_text}.", "",
             f"Settings: {rep.settings.get(ctx.scale, '')}", ""]
    for n in ctx.notes:
        lines += [n, ""]
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines += ["| claim | verdict | margin (closest case) | agreeing | rule |", "|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| **{cell(c.id)}** | **{c.verdict}** | {cell(c.margin)} | {cell(c.agreed)} | {cell(c.rule)} |")
    lines.append("")
    for c in claims:
        measured = "; ".join(f"{k} = {fmt(v)}" for k, v in c.measured.items())
        lines += [f"## {c.id}: {c.verdict}", "", f"*Claim*: {c.statement}", "", f"*Paper*: {c.paper}", "",
                  f"*Rule*: {c.rule} (reads: {', '.join(c.reads) or 'see measured'})", "",
                  f"*Measured*: {measured}", ""]
        if c.margin:
            lines += [f"*Margin*: {c.margin}; *agreeing*: {c.agreed or 'n/a'}", ""]
        if c.explanation:
            lines += [f"*Explanation*: {c.explanation}", ""]
        if c.falsified_by:
            lines += [f"*Falsification test*: {c.falsified_by}", ""]
    for filename, caption in ctx.figures:
        lines += [f"![{caption}]({filename})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def draw_groups(ax, groups: dict[str, Sequence[RunResult]], x: str, y: str, *, logx: bool = False,
                logy: bool = False) -> None:
    """On ``ax``: one line per group, the mean over its runs (seeds) on a common x axis with a
    ± 1 std band (:func:`gradsparse.experiments.plots.seed_band`: interpolated on the plotted
    scale, so on a log axis the centre is a geometric mean and the band a factor)."""
    from ..experiments.plots import readable_axis, seed_band

    for label, runs in groups.items():
        curves = [c for c in (r.series(x, y) for r in runs if r.metrics) if c[0]]
        band = seed_band(curves, logx=logx, logy=logy) if curves else None
        if band is None:
            continue
        xs, centre, lo, hi = band
        (line,) = ax.plot(xs, centre, label=label + (f" ({len(curves)} seeds)" if len(curves) > 1 else ""))
        if len(curves) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    readable_axis(ax, "x", x)
    readable_axis(ax, "y", y)
    ax.grid(alpha=0.3)


def plot_curves(ctx: Context, groups: dict[str, Sequence[RunResult]], x: str, y: str, filename: str,
                caption: str, *, logy: bool = False, logx: bool = False, xlabel: str | None = None,
                ylabel: str | None = None, title: str | None = None) -> Path:
    """One line per group (the mean over its runs on a common, interpolated x axis; see
    :func:`draw_groups`) with a ± std band when a group holds several runs (seeds); saved
    through :meth:`Context.figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    draw_groups(ax, groups, x, y, logx=logx, logy=logy)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ctx.figure(fig, filename, caption + (" (mean over seeds on a common interpolated x axis, ± 1 std band"
                                                + ("; geometric on the log axis)" if logy else ")")))
