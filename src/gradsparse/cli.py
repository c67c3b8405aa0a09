"""Command line: ``gradsparse run CONFIG.yaml [--set key=value ...] [--out DIR]``.

Other commands: ``gradsparse demo`` (the embedded default example), ``gradsparse compare``
(one plot of several run directories), ``gradsparse examples`` (list shipped configs),
``gradsparse bench`` (the benchmark suite), ``gradsparse data list|download NAME`` (data sets).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

from .command_line import OneLineParser, UsageError, error, example_path, resolve_config
from .config import ConfigError, load_config


def _ended(exc) -> int:
    """A run that ended early: one line, its run directory, the exit code (3 diverged, 130/143
    interrupted)."""
    where = f"; run directory {exc.run_dir}" if exc.run_dir is not None and str(exc.run_dir) not in str(exc) else ""
    hint = f" (continue with: gradsparse run --resume {exc.run_dir})" if exc.status == "interrupted" else ""
    print(f"gradsparse: {exc.status}: {exc}{where}{hint}", file=sys.stderr)
    return exc.exit_code


def cmd_run(args) -> int:
    from .experiments.errors import RunEnded, RunFailed
    from .experiments.rundir import StorageError
    from .experiments.runner import resume, run

    progress = False if args.no_progress else None
    try:
        if args.resume is not None:
            if args.config is not None or args.set or args.out is not None or args.overwrite or args.tensorboard:
                return error("--resume RUN_DIR takes no config, --set, --out, --overwrite or --tensorboard: it "
                              "continues the run with the config saved in RUN_DIR (edit RUN_DIR/config.yaml and "
                              "pass --allow-config-change to change it)")
            out = resume(args.resume, progress=progress, allow_config_change=args.allow_config_change)
        else:
            if args.allow_config_change:
                return error("--allow-config-change goes with --resume RUN_DIR (a new run takes any config)")
            if args.config is None:
                return error("run needs a config (a YAML file or a shipped example name) or --resume RUN_DIR")
            overrides = list(args.set)
            if args.no_memory_check:
                overrides.append("memory_check=false")
            if args.tensorboard:
                overrides.append("metrics.tensorboard=true")
            cfg = load_config(resolve_config(args.config), overrides)
            out = run(cfg, args.out, progress=progress, overwrite=args.overwrite)
    except ConfigError as exc:
        return error(exc)
    except RunEnded as exc:
        return _ended(exc)
    except StorageError as exc:  # before the first step (the run's folder, its lock)
        print(f"gradsparse: failed: {' '.join(str(exc.strerror or exc).split())}", file=sys.stderr)
        return RunFailed.exit_code
    except OSError as exc:
        return error(f"cannot write the run directory: {exc}", RunFailed.exit_code)
    except MemoryError as exc:
        return error(f"out of memory ({exc}); lower workers.count, the model or the batch "
                      "(the up-front estimate did not foresee it)", 1)
    print(f"run directory: {out}")
    return 0


DEMO_CONFIGS = ("toy_uplink", "toy_bidirectional", "toy_downlink_only", "digits_mlp_topk")


def cmd_demo(args) -> int:
    """The embedded default: the paper-003 toy on three topologies and a digits MLP."""
    from .experiments.plots import compare_runs
    from .experiments.runner import run

    from .experiments.errors import RunEnded, RunFailed
    from .experiments.rundir import StorageError, check_out_dir

    out = Path(args.out)
    try:  # every config and path is checked before the first run writes anything
        cfgs = [load_config(example_path(name), args.set) for name in DEMO_CONFIGS]
        for name in DEMO_CONFIGS:  # (out itself holds the demo's runs and plot: it is not a run directory)
            check_out_dir(out / name, overwrite=True)
    except ConfigError as exc:
        return error(exc)
    dirs = []
    try:
        for name, cfg in zip(DEMO_CONFIGS, cfgs):
            d = run(cfg, out / name, progress=not args.no_progress, overwrite=True)  # the demo replaces its own runs
            print(f"{name}: {d}")
            dirs.append(d)
    except ConfigError as exc:
        return error(exc)
    except RunEnded as exc:
        return _ended(exc)
    except StorageError as exc:
        print(f"gradsparse: failed: {' '.join(str(exc.strerror or exc).split())}", file=sys.stderr)
        return RunFailed.exit_code
    fig = compare_runs(dirs[:3], out / "toy_topologies.png")
    print(f"comparison plot: {fig}")
    return 0


def cmd_compare(args) -> int:
    from .experiments.plots import compare_runs

    not_dirs = [d for d in args.runs if Path(d).exists() and not Path(d).is_dir()]
    if not_dirs:
        return error(f"compare: {not_dirs[0]!r} is not a run directory (give the folders that hold metrics.csv)")
    try:
        print(compare_runs(args.runs, args.out, args.metric))
    except (ValueError, FileNotFoundError) as exc:
        return error(exc)
    except OSError as exc:  # e.g. --out under a file, or in a folder that does not exist
        return error(f"compare: cannot write --out {args.out!r}: {exc.strerror or exc}")
    return 0


def cmd_examples(args) -> int:
    base = Path(str(resources.files("gradsparse") / "examples"))
    for p in sorted(base.glob("*.yaml")):
        print(p.stem)
    return 0


def cmd_budget_compare(args) -> int:
    """top-k vs hand-tuned hard-threshold vs budget_threshold at equal bytes (issue 11)."""
    from .experiments.budget import compare

    try:
        summary = compare(args.out, seeds=args.seeds, quick=args.quick)
    except (ConfigError, FileExistsError) as exc:
        return error(exc)
    print(Path(summary["files"]["markdown"]).read_text(), end="")
    print(f"table: {summary['files']['csv']}, plot: {summary['files']['plot']}")
    return 0


def cmd_sweep(args) -> int:
    """A grid of runs in parallel processes, with a table and a plot."""
    from .experiments.errors import RunEnded
    from .experiments.sweep import SweepInterrupted, sweep

    try:
        overrides = [*args.set, *(["metrics.tensorboard=true"] if args.tensorboard else [])]
        out = sweep(resolve_config(args.config), args.grid, args.out, seeds=args.seeds, processes=args.processes,
                    overrides=overrides, progress=not args.no_progress)
    except ConfigError as exc:
        return error(exc)
    except SweepInterrupted as exc:
        print(f"gradsparse: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunEnded as exc:  # a run of the grid could not be written (RunFailed)
        return _ended(exc)
    print((out / "table.md").read_text(), end="")
    print(f"runs: {out / 'runs'}, table: {out / 'table.csv'}, plot: {out / 'sweep.png'}")
    return 0


def cmd_reproduce(args) -> int:
    """One paper reproduction (or all of them): runs, figures, report.md, summary.json."""
    from . import reproduce
    from .reproduce.base import DataMissing

    table = reproduce.reproductions()
    if args.list or args.name is None:
        for rep in table.values():
            print(f"{rep.name:24s} paper {rep.paper}  {rep.title}")
            for scale in ("small", "full"):
                print(f"{'':24s}   {scale}: {rep.settings.get(scale, '')}")
        return 0
    if args.seeds is not None and args.seeds < 1:
        return error(f"--seeds must be >= 1, got {args.seeds}")
    if args.name == "all":
        from .reproduce.suite import run_all

        out = Path(args.out or f"reproductions/{args.scale}")
        summaries = run_all(list(table), args.scale, args.seeds, out, processes=args.processes,
                            progress=not args.no_progress)
        print((out / "index.md").read_text().split("\n## ")[0])
        print(f"index: {out / 'index.md'} and {out / 'index.html'}")
        return 0 if all(s["status"] in ("completed", "missing data") for s in summaries.values()) else 1
    if args.name not in table:
        return error(f"unknown reproduction {args.name!r}; allowed: {', '.join(table)}, all (see --list)")
    out = Path(args.out or f"reproductions/{args.scale}/{args.name}")
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        rep = table[args.name]
        total = rep.expected_runs(args.scale, args.seeds or rep.seeds) if rep.expected_runs else None
        bar = tqdm(total=total, desc=args.name, unit="run", dynamic_ncols=True)
    try:
        summary = reproduce.execute(table[args.name], args.scale, args.seeds, out,
                                    processes=args.processes or os.cpu_count() or 1,
                                    on_run=(lambda key: bar.update(1)) if bar is not None else None)
    except DataMissing as exc:
        return error(str(exc), code=3)
    finally:
        if bar is not None:
            bar.close()
    for c in summary["claims"]:
        print(f"{c['verdict']:>14s}  {c['id']}: {c['statement']}")
    print(f"report: {out / 'report.md'}, summary: {out / 'summary.json'}")
    return 0


def cmd_data(args) -> int:
    """``data list``: each data set, where it is looked for, present or missing; ``data download
    NAME``: fetch (checksum-verified) into DATA_DIR/NAME."""
    from . import datasets

    try:
        if args.action == "list":
            for name, ds in datasets.DATASETS.items():
                gone = datasets.missing(name, args.data_dir)
                state = "present" if not gone else f"missing {len(gone)} of {len(ds.files)} files"
                print(f"{name:14s} {state:26s} {ds.description}")
                print(f"{'':14s} looked for in: {', '.join(str(d) for d in ds.dirs(args.data_dir))}")
            return 0
        if args.name is None:
            return error(f"data download needs a data set name: one of {', '.join(datasets.DATASETS)}")
        paths = datasets.download(args.name, args.data_dir, base_url=args.base_url, force=args.force,
                                  progress=not args.no_progress)
    except ValueError as exc:
        return error(exc)
    except OSError as exc:
        return error(exc, 1)
    for p in paths:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="gradsparse", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a config on its engine (engine: sync | loop)")
    r.add_argument("config", nargs="?", default=None,
                   help="YAML file, or the name of a shipped example (see `gradsparse examples`)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted key")
    r.add_argument("--out", default=None, help="run directory (default runs/<name>); must not be an existing run")
    r.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory at --out")
    r.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue although RUN_DIR/config.yaml was edited since the checkpoint "
                   "(each changed key is named and recorded in summary.json)")
    r.add_argument("--no-memory-check", action="store_true",
                   help="skip the up-front memory estimate (same as --set memory_check=false)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files into the run directory (metrics.tensorboard=true)")
    r.set_defaults(fn=cmd_run)
    dm = sub.add_parser("demo", help="run the embedded default examples and write plots")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dm.add_argument("--no-progress", action="store_true")
    dm.set_defaults(fn=cmd_demo)
    c = sub.add_parser("compare", help="plot several run directories together")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", default="compare.png")
    c.add_argument("--metric", default=None)
    c.set_defaults(fn=cmd_compare)
    e = sub.add_parser("examples", help="list the shipped example configs")
    e.set_defaults(fn=cmd_examples)
    bc = sub.add_parser("budget-compare", help="top-k vs hard-threshold vs budget_threshold at the same total bytes")
    bc.add_argument("--out", required=True, help="output directory (tables, plot, verdict, runs/)")
    bc.add_argument("--seeds", type=int, default=3)
    bc.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    bc.set_defaults(fn=cmd_budget_compare)
    sw = sub.add_parser("sweep", help="a grid of runs in parallel processes: --grid key=v1,v2 (repeatable)")
    sw.add_argument("config", help="YAML file or shipped example name")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a dotted key and its values")
    sw.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per grid point")
    sw.add_argument("--processes", type=int, default=None, help="parallel runs (default: the number of cores)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    sw.add_argument("--out", required=True, help="output folder (new or empty)")
    sw.add_argument("--no-progress", action="store_true")
    sw.add_argument("--tensorboard", action="store_true",
                    help="TensorBoard event files in every run directory (tensorboard --logdir OUT/runs)")
    sw.set_defaults(fn=cmd_sweep)
    rp = sub.add_parser("reproduce", help="reproduce a paper's claims: gradsparse reproduce NAME|all [--scale small|full]")
    rp.add_argument("name", nargs="?", default=None, help="a reproduction (see --list) or 'all'")
    rp.add_argument("--list", action="store_true", help="list the reproductions and their settings")
    rp.add_argument("--scale", choices=["small", "full"], default="small",
                    help="small: offline data, minutes; full: the papers' data sets and settings")
    rp.add_argument("--seeds", type=int, default=None,
                    help="seeds 0..N-1 for every compared method (default: each reproduction's own, 5 where a "
                         "verdict rests on an ordering over seeds; see --list)")
    rp.add_argument("--out", default=None, help="output folder (default reproductions/SCALE[/NAME])")
    rp.add_argument("--processes", type=int, default=None, help="parallel processes (default: the number of cores)")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(fn=cmd_reproduce)
    da = sub.add_parser("data", help="the downloadable data sets: gradsparse data list | gradsparse data download NAME")
    da.add_argument("action", choices=("list", "download"))
    da.add_argument("name", nargs="?", default=None, help="data set (download): mnist, fashion_mnist, cifar10, "
                    "gisette, madelon, rcv1")
    da.add_argument("--data-dir", default=None, help="data directory (default $GRADSPARSE_DATA or ~/.cache/gradsparse)")
    da.add_argument("--base-url", default=None, help="fetch every file from BASE_URL/FILE instead of the registry's hosts")
    da.add_argument("--force", action="store_true", help="download again even when the files are present")
    da.add_argument("--no-progress", action="store_true")
    da.set_defaults(fn=cmd_data)
    sub.add_parser("bench", help="benchmark suite: gradsparse bench [--quick] [--only topk,wire,simulator] [--out DIR]")
    sub.add_parser("launch", help="run a config as N processes under torchrun (engine: torch): "
                   "gradsparse launch CONFIG --nproc N [--out DIR] [--set KEY=VALUE]")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # the suite has its own options
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "launch":  # N processes under torchrun on engine torch (gradsparse.distributed.launch)
        from .distributed.launch import main as launch_main

        return launch_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return error(exc)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:  # outside a run's own handler (e.g. while the task loads, or between runs)
        what = " before the run started; nothing was written" if getattr(args, "fn", None) is cmd_run else \
            "; finished runs and reports stay where they were written"
        print(f"gradsparse: interrupted (SIGINT){what}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
