"""The program each torchrun process runs for ``engine: torch``.

``torchrun --nproc-per-node N -m gradsparse.distributed.worker CONFIG [--out DIR] [--set K=V]``
(``gradsparse launch CONFIG --nproc N`` builds that command): every rank runs the config on
:class:`gradsparse.engines.torch_dist.TorchDistEngine`; rank 0 writes the run directory, exactly
what ``gradsparse run`` writes; the other ranks write theirs to a temporary directory that is
removed.

Restarts: with ``checkpoint_every`` in the config, every rank also writes restart checkpoints
next to the run directory, and a job started again (by ``torchrun --max-restarts`` or by hand
with the same command) continues from the newest step all ranks have
(:mod:`gradsparse.distributed.restart`). ``GRADSPARSE_FAIL_ONCE_AT=RANK:STEP`` makes one rank
fail once, to test that.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist


#: what Gloo says when a peer process died: not this rank's fault, so one line instead of a traceback
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer")


def main(argv: list[str] | None = None) -> int:
    """Entry point of each torchrun process: run CONFIG on engine torch; rank 0 writes the run
    directory (the others write theirs to a temporary directory that is removed)."""
    from ..experiments.loop import StopSignals

    # SIGINT / SIGTERM (torchrun passes them on) are caught from here on: one during set-up ends
    # the run after its first step, with its files, instead of killing this rank mid-way
    with StopSignals() as caught:
        return _main(argv, caught)


def _main(argv, caught) -> int:
    from ..config import ConfigError, load_config
    from ..experiments.errors import RunDiverged, RunFailed, RunInterrupted
    from ..experiments.rundir import LOCK_ENV, StorageError, default_out

    ap = argparse.ArgumentParser(prog="python -m gradsparse.distributed.worker")
    ap.add_argument("config", nargs="+", help="one or more configs, run one after the other "
                    "(several: each in OUT/<config stem>)")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=None)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run directory (and its "
                    "restart checkpoints) instead of refusing")
    args = ap.parse_args(argv)
    # ranks other than 0 write nothing that is kept: they record only step and epoch (their
    # metrics would repeat rank 0's; a parameter-server worker does not hold every worker's state)
    quiet = [] if int(os.environ.get("RANK", "0")) == 0 else [
        "metrics.names=[step, epoch]", "metrics.residual_ratio.steps=[]", "metrics.per_worker_error_norms=false",
        "metrics.tensorboard=false", "plots=false"]
    try:
        # an asynchronous config runs the asynchronous protocol over processes, any other engine torch
        cfgs = [load_config(c, [*args.set, *quiet]) for c in args.config]
        cfgs = [load_config(c, [*args.set, *quiet, "engine=" + ("torch_async" if cfg.engine in ("async", "torch_async")
                                                                  else "torch")]) for c, cfg in zip(args.config, cfgs)]
    except ConfigError as exc:
        print(f"gradsparse: error: {exc}", file=sys.stderr)
        return 2
    outs = [args.out] if len(cfgs) == 1 else [
        None if args.out is None else str(Path(args.out) / Path(c).stem) for c in args.config]
    from ..engines.torch_dist import _init_from_env

    _init_from_env()
    where = args.out if args.out is not None else "RUN_DIR"
    # under gradsparse launch the same command is refused (the run directory exists): say --resume
    again = (f"gradsparse launch --resume {where}" if os.environ.get(LOCK_ENV) else
             f"the same torchrun command, or gradsparse launch --resume {where}")
    try:
        for cfg, out_dir in zip(cfgs, outs):
            run_one(cfg, Path(out_dir) if out_dir is not None else default_out(cfg), overwrite=args.overwrite)
    except QuietOnOtherRanks as exc:
        if dist.get_rank() == 0:
            print(f"gradsparse: error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError) as exc:
        print(f"gradsparse: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except RunFailed as exc:  # a write failed (disk full, ...): the rank says which; exit 4
        print(f"gradsparse: rank {dist.get_rank()}: failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except StorageError as exc:
        print(f"gradsparse: rank {dist.get_rank()}: failed: {' '.join(str(exc.strerror or exc).split())}",
              file=sys.stderr)
        return RunFailed.exit_code
    except RunInterrupted as exc:  # every rank stops after the same step (see restart.py)
        print(f"gradsparse: rank {dist.get_rank()}: {exc}; continue with: {again}", file=sys.stderr)
        return 128 + exc.signum
    except RunDiverged as exc:  # every rank stops after the same step with the same report: rank 0 says it
        if dist.get_rank() == 0:
            print(f"gradsparse: diverged: {exc}; run directory {exc.run_dir}", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        if not any(s in str(exc) for s in _PEER_LOST):
            raise
        print(f"gradsparse: rank {dist.get_rank()}: another rank stopped mid-step (its own message says why); "
              f"continue with: {again}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()
    return 0


def run_asynchronous(cfg, out_dir: Path) -> None:
    """``engine: torch_async``: rank 0 serves and writes ``out_dir``; the other ranks are workers
    (:mod:`gradsparse.engines.torch_async`). Real timing makes such a run unrepeatable, so it
    keeps no restart checkpoints."""
    from ..experiments.build import build_engine
    from ..experiments.runner import run

    if dist.get_rank() == 0:
        print(f"run directory: {run(cfg, out_dir, progress=False)}")
    else:
        build_engine(cfg).serve_as_worker()
    dist.barrier()


class QuietOnOtherRanks(ValueError):
    """An error every rank raises alike: rank 0 says it, the others exit with the same status."""


def run_one(cfg, out_dir: Path, overwrite: bool = False) -> None:
    """Run one config on this rank, continuing from the ranks' newest common restart checkpoint
    when there is one (:mod:`gradsparse.distributed.restart`); rank 0 writes ``out_dir``."""
    from ..config import dump_config
    from ..experiments.runner import run
    from .restart import RestartCheckpoints, injected_failure

    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.engine == "torch_async":
        return run_asynchronous(cfg, out_dir)
    # every rank hashes rank 0's view of the config (the others record fewer metrics)
    text = [dump_config(cfg) if rank == 0 else None]
    dist.broadcast_object_list(text, src=0)
    restart = RestartCheckpoints(out_dir, rank, world, text[0])
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if overwrite and restart_count == 0 and rank == 0:  # a fresh run: the old run's restart points go too
        restart.clear()
    # rank 0 checks the folder (and writes its manifest before any rank can save); every rank
    # gets its verdict, so all stop with the same error or all go on
    verdict: list = [None]
    if rank == 0:
        try:
            restart.check_manifest()
            if cfg.checkpoint_every:
                restart.write_manifest()
        except ValueError as exc:
            verdict[0] = str(exc)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise QuietOnOtherRanks(verdict[0])
    restart.clean_temporaries()
    step = restart.common_readable_step()
    state = None
    if step is not None:
        state = restart.load(step)
        print(f"rank {rank}: resuming from the restart checkpoint of step {step} in {restart.dir}", flush=True)
    on_step = injected_failure(os.environ.get("GRADSPARSE_FAIL_ONCE_AT"), rank, restart_count)
    kwargs = dict(progress=False, resume_state=state, on_checkpoint=restart.save, on_step=on_step)
    if rank == 0:
        # a restarted job replaces what its failed attempt left (e.g. an "interrupted" run directory)
        out = run(cfg, out_dir, overwrite=overwrite or state is not None or restart_count > 0, **kwargs)
        print(f"run directory: {out}")
    else:
        tmp = tempfile.mkdtemp(prefix=f"gradsparse-rank{rank}-")
        try:
            run(cfg, tmp, **kwargs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if rank == 0:
        restart.clear()


if __name__ == "__main__":
    sys.exit(main())
