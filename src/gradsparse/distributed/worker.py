"""The program each torchrun process runs for ``engine: torch``.

``torchrun --nproc-per-node N -m gradsparse.distributed.worker CONFIG [--out DIR] [--set K=V]``
(``gradsparse launch CONFIG --nproc N`` builds that command): every rank runs the config on
:class:`gradsparse.engines.torch_dist.TorchDistEngine`; rank 0 writes the run directory, exactly
what ``gradsparse run`` writes; the other ranks write theirs to a temporary directory that is
removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    """Entry point of each torchrun process: run CONFIG on engine torch; rank 0 writes the run
    directory (the others write theirs to a temporary directory that is removed)."""
    from ..config import ConfigError, load_config
    from ..experiments.runner import run

    ap = argparse.ArgumentParser(prog="python -m gradsparse.distributed.worker")
    ap.add_argument("config", nargs="+", help="one or more configs, run one after the other "
                    "(several: each in OUT/<config stem>)")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # ranks other than 0 write nothing that is kept: they record only step and epoch (their
    # metrics would repeat rank 0's; a parameter-server worker does not hold every worker's state)
    quiet = [] if int(os.environ.get("RANK", "0")) == 0 else [
        "metrics.names=[step, epoch]", "metrics.residual_ratio.steps=[]", "metrics.per_worker_error_norms=false",
        "plots=false"]
    try:
        cfgs = [load_config(c, [*args.set, "engine=torch", *quiet]) for c in args.config]
    except ConfigError as exc:
        print(f"gradsparse: error: {exc}", file=sys.stderr)
        return 2
    outs = [args.out] if len(cfgs) == 1 else [
        None if args.out is None else str(Path(args.out) / Path(c).stem) for c in args.config]
    from ..engines.torch_dist import _init_from_env

    _init_from_env()
    try:
        for cfg, out_dir in zip(cfgs, outs):
            if dist.get_rank() == 0:
                out = run(cfg, out_dir, progress=False)
                print(f"run directory: {out}")
            else:
                tmp = tempfile.mkdtemp(prefix=f"gradsparse-rank{dist.get_rank()}-")
                try:
                    run(cfg, tmp, progress=False)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
    except ConfigError as exc:
        print(f"gradsparse: error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
