"""``gradsparse launch CONFIG --nproc N``: a thin wrapper over torchrun on one machine.

It runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m
gradsparse.distributed.worker CONFIG [--out DIR] [--set K=V ...]``: N processes on engine
``torch`` (gloo on CPU, nccl with CUDA); rank 0 writes the same run directory as ``gradsparse
run``. The rendezvous is torchrun's standalone one on localhost; Gloo is told to use the
loopback interface (``GLOO_SOCKET_IFNAME=lo`` unless already set). ``--dry-run`` prints the
command. For several machines run torchrun yourself (see :mod:`gradsparse.engines.torch_dist`).

Nothing starts before every config has been built as rank 0 would build it (the task, user
tasks included, the algorithm, the data split, the engine's own refusals: stagewise learning on
a parameter server, ``staleness_bound``, Kardam's ``rejected: restore`` and ``update_cosine`` on
``torch_async``), with a stand-in engine that needs no process group: a config the ranks would
refuse is one ``gradsparse: error:`` line and exit status 2, and no process is started.

``gradsparse launch --resume OUT`` continues a stopped run (a failed rank, SIGINT/SIGTERM, a lost
machine) from its restart checkpoints (config ``checkpoint_every``): the config and the number
of processes come from the restart manifest, and the run ends as the uninterrupted one would.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["build_command", "main"]


def build_command(configs: list[str], nproc: int, out: str | None = None, sets: list[str] | None = None,
                  max_restarts: int = 0, overwrite: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "gradsparse.distributed.worker", *map(str, configs)]
    if out is not None:
        cmd += ["--out", str(out)]
    for s in sets or []:
        cmd += ["--set", s]
    if overwrite:
        cmd += ["--overwrite"]
    return cmd


def _preflight_classes():
    """Stand-ins for the two engines the ranks run, built in the launcher's own process: the same
    construction as a rank's engine (task, algorithm, schedule, data, state; every check of
    :func:`gradsparse.experiments.build.build_engine`) without a process group, plus the
    refusals the real engines make in their constructors."""
    from ..engines.async_sim import AsyncSimulator
    from ..engines.synchronous import SynchronousEngine
    from ..engines.torch_async import TorchAsyncEngine
    from ..engines.torch_dist import TorchDistEngine

    class TorchPreflight(SynchronousEngine):
        name, topologies, metrics = TorchDistEngine.name, TorchDistEngine.topologies, TorchDistEngine.metrics

        def worker_round(self, w, t, lr):  # pragma: no cover - never stepped
            raise RuntimeError("a launch preflight engine is not stepped")

    class TorchAsyncPreflight(AsyncSimulator):
        name, topologies, metrics = TorchAsyncEngine.name, TorchAsyncEngine.topologies, TorchAsyncEngine.metrics

        def __init__(self, task, algorithm, schedule, **kw) -> None:
            why = torch_async_refusal(kw)
            if why is not None:
                raise ValueError(why)
            super().__init__(task, algorithm, schedule, **kw)

    return {"torch": TorchPreflight, "torch_async": TorchAsyncPreflight}


def torch_async_refusal(kw: dict) -> str | None:
    """What engine 'torch_async' refuses in its constructor (the same rules and words as
    :class:`gradsparse.engines.torch_async.TorchAsyncEngine`), given its keyword arguments."""
    if kw.get("staleness_bound") is not None:
        return ("engine 'torch_async' does not run staleness_bound (the server would have to restore a "
                "worker's state in another process); use drop_older_than, or engine 'async'")
    kardam = kw.get("kardam")
    if kardam is not None and kardam.enabled and kardam.rejected == "restore":
        return "engine 'torch_async' runs Kardam's filter with rejected: drop only"
    if kw.get("update_cosine"):
        return "engine 'torch_async' does not record update_cosine (it needs worker data on the server)"
    return None


def rank_engine(engine: str) -> str:
    """The engine a rank runs for a config's ``engine`` (:mod:`gradsparse.distributed.worker`)."""
    return "torch_async" if engine in ("async", "torch_async") else "torch"


def check_as_a_rank(path: str, sets: list[str], nproc: int) -> None:
    """Build config ``path`` as rank 0 would (with ``engine`` set as the worker sets it), with
    the stand-in engine: raises ConfigError with what a rank would refuse (an unknown task or
    one that does not load, the algorithm, the data split, the memory estimate, metrics the
    engine does not record, TensorBoard without the package, stagewise learning on a
    parameter server, torch_async's unsupported rules)."""
    from ..config import ConfigError, load_config
    from ..experiments.build import build_engine
    from ..experiments.runner import check_outputs
    from ..topology import TOPOLOGIES

    cfg = load_config(path, sets)
    engine = rank_engine(cfg.engine)
    cfg = load_config(path, [*sets, f"engine={engine}"])
    n = cfg.workers.count
    if engine == "torch":
        parameter_server = TOPOLOGIES[cfg.algorithm.topology.kind].has_server and nproc == n + 1
        if parameter_server and cfg.schedule.kind == "stagewise":
            raise ConfigError("config key 'schedule.kind': engine 'torch' with a parameter server (rank 0 serving, "
                              f"--nproc {nproc}) does not run stagewise learning; use --nproc {n} (every rank runs the "
                              "server step) or engine sync")
    built = build_engine(cfg, engine_class=_preflight_classes()[engine])
    check_outputs(cfg, built)


def run_dirs(configs: list[str], sets: list[str], out: str | None) -> list[Path]:
    """Where the worker will write each config's run directory (a link followed to its folder)."""
    from ..config import load_config
    from ..experiments.rundir import default_out

    dirs = []
    for path in configs:
        where = default_out(load_config(path, sets)) if out is None else Path(out) if len(configs) == 1 \
            else Path(out) / Path(path).stem
        if where.is_symlink() and where.is_dir():
            where = Path(os.path.realpath(where))
        dirs.append(where)
    return dirs


def _check_before_starting(configs: list[str], nproc: int, sets: list[str], out: str | None,
                           check_out: bool = True, overwrite: bool = False) -> str | None:
    """Why these configs cannot run as ``nproc`` processes (validation, the process count,
    everything a rank would refuse when it builds its engine, and, with ``check_out``, the run
    directory as the worker would place it), before torchrun starts anything; None when they can."""
    from pathlib import Path

    from ..config import ConfigError, load_config
    from ..engines.torch_dist import world_sizes
    from ..experiments.rundir import check_out_dir, default_out
    from ..topology import TOPOLOGIES

    for path in configs:
        try:
            cfg = load_config(path, sets)
        except ConfigError as exc:
            return str(exc)
        n = cfg.workers.count
        if cfg.engine in ("async", "torch_async"):
            engine, allowed, what = "torch_async", (n + 1,), "rank 0 as the server and one process per worker"
        else:
            has_server = TOPOLOGIES[cfg.algorithm.topology.kind].has_server
            engine, allowed = "torch", world_sizes(n, has_server)
            what = "one process per worker" + (", or one more for a parameter server (rank 0)" if has_server else "")
        if nproc not in allowed:
            return (f"--nproc {nproc}: config {path!r} has workers.count = {n} and engine {engine!r} runs {what}: "
                    f"--nproc {' or '.join(map(str, allowed))}, or --set workers.count=N to match")
        if check_out:
            where = default_out(cfg) if out is None else Path(out) if len(configs) == 1 else Path(out) / Path(path).stem
            try:
                check_out_dir(where, overwrite=overwrite)
            except ConfigError as exc:
                return str(exc)
        try:
            check_as_a_rank(path, sets, nproc)
        except ConfigError as exc:
            return str(exc)
        except MemoryError as exc:
            return f"building config {path!r} ran out of memory ({exc}); make the task or workers.count smaller"
    return None


def main(argv: list[str] | None = None) -> int:
    from ..command_line import OneLineParser, UsageError, error, resolve_config

    ap = OneLineParser(prog="gradsparse launch", description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="*", help="YAML file(s) or shipped example name(s); workers.count must equal "
                    "--nproc (several configs run one after the other, each in OUT/<stem>)")
    ap.add_argument("--nproc", type=int, default=None, help="processes (one per worker)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-restarts", type=int, default=0)
    ap.add_argument("--resume", default=None, metavar="RUN_DIR",
                    help="continue a stopped run from its restart checkpoints (config and world size from them)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run directory at --out "
                    "(and its restart checkpoints) instead of refusing")
    ap.add_argument("--dry-run", action="store_true", help="print the torchrun command only")
    ap.add_argument("--tensorboard", action="store_true",
                    help="rank 0 writes TensorBoard event files into the run directory (metrics.tensorboard=true)")
    try:
        args = ap.parse_args(argv)
    except UsageError as exc:
        return error(str(exc))
    if args.max_restarts < 0:
        return error(f"--max-restarts must be >= 0, got {args.max_restarts}")

    if args.resume is not None:
        from .restart import read_manifest, restart_dir

        if args.config or args.set or args.out is not None or args.overwrite:
            return error("--resume RUN_DIR takes no config, --set, --out or --overwrite: it continues the run with "
                         "the config saved in its restart checkpoints")
        try:
            manifest = read_manifest(args.resume)
        except ValueError as exc:
            return error(f"--resume: {exc}")
        if args.nproc is not None and args.nproc != manifest["world_size"]:
            return error(f"--nproc {args.nproc}: the run was started with {manifest['world_size']} processes "
                         "(its memories belong to those workers)")
        args.nproc = manifest["world_size"]
        saved = restart_dir(args.resume) / "config.yaml"
        args.config, args.out = [str(saved)], str(args.resume)
    if not args.config:
        return error("launch needs a config (a YAML file or a shipped example name) or --resume RUN_DIR")
    if args.nproc is None:
        return error("launch needs --nproc N (one process per worker)")
    if args.nproc < 1:
        return error("--nproc must be >= 1")
    if args.tensorboard:
        if args.resume is not None:
            return error("--resume RUN_DIR takes no --tensorboard: it continues with the saved config")
        args.set.append("metrics.tensorboard=true")
    from ..config import ConfigError
    from ..experiments.rundir import LOCK_ENV, RunLock, StorageError, atomic_write_text

    locks = []
    try:
        if args.resume is not None:  # the run directory is locked before the saved config is written out
            where = Path(args.resume)
            where = Path(os.path.realpath(where)) if where.is_symlink() and where.is_dir() else where
            locks.append(RunLock(where, key="--resume").acquire())
            atomic_write_text(Path(args.config[0]), manifest["config"])
        configs = [str(resolve_config(c)) for c in args.config]
        why = _check_before_starting(configs, args.nproc, list(args.set), args.out, check_out=args.resume is None,
                                     overwrite=args.overwrite)
        if why is not None:
            return error(why)
        cmd = build_command(configs, args.nproc, args.out, list(args.set), args.max_restarts, args.overwrite)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        if args.resume is None:
            # one writer per run directory: this launcher holds the lock for its ranks (rank 0 writes)
            for where in run_dirs(configs, list(args.set), args.out):
                locks.append(RunLock(where).acquire())
        env = dict(os.environ)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("OMP_NUM_THREADS", "1")
        env[LOCK_ENV] = str(os.getpid())
        return run_torchrun(cmd, env)
    except ConfigError as exc:
        return error(str(exc))
    except StorageError as exc:
        print(f"gradsparse: failed: {' '.join(str(exc.strerror or exc).split())}", file=sys.stderr)
        return 4
    finally:
        for lock in locks:
            lock.release()


def _die_with_parent() -> None:
    """In the child before exec (Linux): the kernel sends it SIGTERM when its parent, the
    launcher, dies, even by SIGKILL; torchrun then stops its ranks as on ``kill -TERM``."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launcher's own handlers are all there is
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_torchrun(cmd: list[str], env: dict) -> int:
    """Run torchrun in its own session and wait. SIGINT / SIGTERM to this process are passed to
    torchrun once (it passes them to the ranks, which finish the step, checkpoint and stop), and
    the exit status is then 130 / 143; SIGHUP (the terminal closed) is passed on as SIGTERM (exit
    129). torchrun's lifetime is tied to the launcher's: if the launcher dies (even by SIGKILL),
    the kernel sends torchrun SIGTERM (Linux ``PR_SET_PDEATHSIG``), so nothing runs on
    unattended. torchrun's own Python traceback (its ChildFailedError or SignalException after a
    rank failed or was stopped: the ranks have already said why) is left out of stderr;
    everything else, the ranks' output included, passes through."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                            start_new_session=True, preexec_fn=_die_with_parent)
    got: dict = {"signum": None}

    def forward(signum, frame):
        if got["signum"] is None:
            got["signum"] = signum
            try:
                proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
            except ProcessLookupError:
                pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for line in without_launcher_tracebacks(proc.stderr):
            sys.stderr.write(line)
        rc = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 128 + got["signum"] if got["signum"] is not None else rc


def without_launcher_tracebacks(lines):
    """The lines, less every traceback raised inside torchrun itself (its frames include
    ``torch/distributed/run.py`` and its exception is a ``torch.distributed.elastic`` one)."""
    block: list[str] = []
    for line in lines:
        if block:
            block.append(line)
            if line[:1] not in (" ", "\t") and not line.startswith("Traceback"):  # the exception line ends it
                if not ("torch/distributed/run.py" in "".join(block) and line.startswith("torch.distributed.elastic")):
                    yield from block
                block = []
            continue
        if line.startswith("Traceback (most recent call last):"):
            block = [line]
            continue
        yield line
    yield from block


if __name__ == "__main__":
    sys.exit(main())
