"""gradsparse's DDP communication hook with Hugging Face Accelerate: layer-wise top-k with error
feedback, and the hook's bytes per step in TensorBoard.

    torchrun --nproc-per-node 2 examples/accelerate_ddp.py --steps 20 --out runs/accelerate_ddp
    accelerate launch --num_processes 2 --cpu examples/accelerate_ddp.py --steps 20   # the same

(``pip install 'gradsparse[frameworks]'`` brings accelerate.) Each rank trains a small MLP on its
own data shard (full batches, plain SGD). The recipe: ``accelerator.prepare(model)`` wraps the
model in DistributedDataParallel when several processes run; register the hook on what it
returns (``model.register_comm_hook(state, gradsparse.ddp.hook)``) before the first backward,
with the state built from that model; give the optimizer plain SGD with the state's step size.
(Accelerate's own ``DistributedDataParallelKwargs(comm_hook=...)`` takes only PyTorch's built-in
hooks.)

With ``--out DIR`` rank 0 writes ``DIR/result.pt`` (final parameters, the hook's step and byte
counters) and, with ``--tensorboard``, TensorBoard event files in ``DIR/tensorboard`` with the
hook's bytes per step (:class:`gradsparse.experiments.tensorboard.HookLogger`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradsparse.ddp
from gradsparse.algorithm import Algorithm
from gradsparse.compressors import TopK

FEATURES, CLASSES, SAMPLES_PER_RANK = 20, 4, 64


def make_data(rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s shard: Gaussian inputs labelled by a fixed random linear teacher."""
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(SAMPLES_PER_RANK, FEATURES, generator=torch.Generator().manual_seed(seed + 1 + rank))
    return x, (x @ teacher).argmax(dim=1)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tensorboard", action="store_true", help="log the hook's bytes per step (rank 0)")
    args = ap.parse_args(argv)

    accelerator = Accelerator(cpu=True)
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)  # the hook's step size, no momentum
    model, optimizer = accelerator.prepare(net, optimizer)
    alg = Algorithm(compressor=TopK(density=args.density, scope="layerwise", layout=gradsparse.ddp.layout_of(model)),
                    feedback="ef")
    state = gradsparse.ddp.SparsifiedState(model, alg, lr=args.lr)
    model.register_comm_hook(state, gradsparse.ddp.hook)
    logger = None
    if args.tensorboard and args.out is not None and accelerator.is_main_process:
        from gradsparse.experiments.tensorboard import HookLogger

        logger = HookLogger(state, log_dir=Path(args.out) / "tensorboard")
    x, y = make_data(accelerator.process_index)
    for _ in range(args.steps):
        optimizer.zero_grad()
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        if logger is not None:
            logger.log()
    if logger is not None:
        logger.close()
    if args.out is not None and accelerator.is_main_process:
        from gradsparse.experiments.tensorboard import hook_counters

        Path(args.out).mkdir(parents=True, exist_ok=True)
        params = accelerator.unwrap_model(model).named_parameters()
        torch.save({"params": {n: p.detach().clone() for n, p in params},
                    "step": int(state.step), "counters": hook_counters(state)}, Path(args.out) / "result.pt")
        print(f"rank 0: {state.step} steps, counters {hook_counters(state)}")
    # every rank leaves together: a rank exiting while another still sends can abort in Gloo's
    # destructor ("terminate called without an active exception"); end_training destroys the group
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
