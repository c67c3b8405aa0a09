"""``gradsparse reproduce all``: every reproduction in parallel processes, one overall progress
bar, and an index of all reports with their figures (``OUT/index.md`` and ``OUT/index.html``)."""

from __future__ import annotations

import html
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .base import DataMissing, execute


def _one(name: str, scale: str, seeds: int | None, out: str, queue) -> dict:
    import torch

    torch.set_num_threads(1)
    from . import get

    rep = get(name)
    try:
        return execute(rep, scale, seeds, Path(out), processes=1, on_run=lambda key: queue.put((name, key)))
    except DataMissing as exc:
        return {"name": name, "status": "missing data", "message": str(exc), "claims": []}


def run_all(names: list[str], scale: str, seeds: int | None, out: Path, *, processes: int | None = None,
            progress: bool = True) -> dict:
    """Run the reproductions ``names`` into ``out/NAME`` with up to ``processes`` at a time
    (default: the number of cores); returns name -> summary and writes the index. ``seeds``
    None: each reproduction's own default."""
    from . import get

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reps = [get(n) for n in names]
    # longest first (by measured CPU minutes where known, else by the number of runs), so the last
    # process to finish is not the one that started the longest job
    reps.sort(key=lambda r: (-r.cpu_minutes.get(scale, 0.0) * (seeds or r.seeds) / r.seeds,
                             -(r.expected_runs(scale, seeds or r.seeds) if r.expected_runs else 0)))
    expected = sum(r.expected_runs(scale, seeds or r.seeds) if r.expected_runs else 1 for r in reps)
    processes = max(1, min(processes or os.cpu_count() or 1, len(reps)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=expected, desc=f"reproduce all ({len(reps)})", unit="run", dynamic_ncols=True)
    summaries: dict[str, dict] = {}
    start = time.perf_counter()
    manager = mp.Manager()
    queue = manager.Queue()
    with ProcessPoolExecutor(max_workers=processes) as pool:
        futures = {pool.submit(_one, r.name, scale, seeds, str(out / r.name), queue): r.name for r in reps}
        pending = set(futures)
        while pending:
            done = {f for f in pending if f.done()}
            while not queue.empty():
                queue.get()
                if bar is not None:
                    bar.update(1)
            for f in done:
                name = futures[f]
                try:
                    summaries[name] = f.result()
                except Exception as exc:  # one broken reproduction must not lose the others
                    summaries[name] = {"name": name, "status": "failed", "message": f"{type(exc).__name__}: {exc}",
                                       "claims": []}
                if bar is not None:
                    bar.set_postfix_str(f"finished {name}")
            pending -= done
            time.sleep(0.2)
    manager.shutdown()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    ordered = {n: summaries[n] for n in names}
    write_index(ordered, out, scale, seeds, wall)
    return ordered


def _counts(summary: dict) -> dict[str, int]:
    counts = {"holds": 0, "does not hold": 0, "inconclusive": 0}
    for c in summary.get("claims", []):
        counts[c["verdict"]] += 1
    return counts


def write_index(summaries: dict[str, dict], out: Path, scale: str, seeds: int | None, wall: float) -> None:
    """``index.md`` and ``index.html``: one section per reproduction with its verdicts and
    figures, and ``index.json`` (name -> status and verdict counts)."""
    seeds_text = f"{seeds} seed(s)" if seeds else "each reproduction's default seeds"
    md = [f"# gradsparse paper reproductions (scale {scale}, {seeds_text}, {wall / 60:.1f} min)", "",
          "| reproduction | paper | status | seeds | holds | does not hold | inconclusive | wall min | CPU min |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        c = _counts(s)
        mins = f"{s['wall_seconds'] / 60:.1f}" if "wall_seconds" in s else ""
        cpu = f"{s['cpu_seconds'] / 60:.1f}" if "cpu_seconds" in s else ""
        md.append(f"| [{name}]({name}/report.md) | {s.get('paper', '')} | {s['status']} | {s.get('seeds', '')} | "
                  f"{c['holds']} | {c['does not hold']} | {c['inconclusive']} | {mins} | {cpu} |")
    md.append("")
    body = [f"<h1>gradsparse paper reproductions</h1><p>scale {html.escape(scale)}, {html.escape(seeds_text)}, "
            f"{wall / 60:.1f} min</p>"]
    for name, s in summaries.items():
        md += [f"## {name}: {s.get('title', '')}", ""]
        body.append(f"<h2><a href='{name}/report.md'>{html.escape(name)}</a>: {html.escape(s.get('title', ''))}</h2>")
        if s["status"] != "completed":
            md += [f"{s['status']}: {s.get('message', '')}", ""]
            body.append(f"<p>{html.escape(s['status'])}: {html.escape(s.get('message', ''))}</p>")
        body.append("<ul>")
        for c in s.get("claims", []):
            margin = f" (margin: {c['margin']}; {c['agreed']})" if c.get("margin") else ""
            md.append(f"- **{c['verdict']}** — {c['id']}: {c['statement']}{margin}")
            body.append(f"<li><b>{html.escape(c['verdict'])}</b> — {html.escape(c['id'])}: {html.escape(c['statement'])}</li>")
        body.append("</ul>")
        md.append("")
        for fig in s.get("figures", []):
            md += [f"![{name} {fig}]({name}/{fig})", ""]
            body.append(f"<img src='{name}/{fig}' style='max-width:48%'>")
    (out / "index.md").write_text("\n".join(md))
    (out / "index.html").write_text("<!doctype html><meta charset='utf-8'><title>gradsparse reproductions</title>"
                                    + "\n".join(body))
    (out / "index.json").write_text(json.dumps(
        {n: {"status": s["status"], **_counts(s)} for n, s in summaries.items()}, indent=2))
