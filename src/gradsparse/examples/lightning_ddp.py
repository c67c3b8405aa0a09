"""gradsparse's DDP communication hook in PyTorch Lightning: layer-wise top-k with error feedback.

    torchrun --nproc-per-node 2 examples/lightning_ddp.py --steps 20 --out runs/lightning_ddp

(``pip install 'gradsparse[frameworks]'`` brings pytorch-lightning.) Each rank trains a small MLP
on its own data shard (full batches, plain SGD); every gradient exchange goes through
``gradsparse.ddp.hook``. The recipe:

* build the hook's state from the LightningModule before ``Trainer.fit`` (it names the
  parameters; the memories are keyed by those names);
* register the hook on the DDP model once the strategy has wrapped it: the callback
  :class:`RegisterCommHook` below does ``trainer.strategy.model.register_comm_hook(state, hook)``
  in ``on_fit_start``. On CUDA devices ``DDPStrategy(ddp_comm_hook=gradsparse.ddp.hook,
  ddp_comm_state=state)`` does the same, but Lightning (2.6) registers a strategy's comm hook
  only on CUDA: on CPU (gloo) it is silently ignored, so this example uses the callback, which
  works on both;
* give the optimizer plain SGD with the state's step size (``feedback="ef"`` puts the step size
  inside the messages; the hook returns U / lr and SGD applies U).

With ``--out DIR`` rank 0 writes ``DIR/result.pt`` (final parameters, the hook's step and byte
counters) — what tests/test_frameworks.py compares with gradsparse's simulator.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    class Classifier(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=args.lr)  # the hook's step size, no momentum

    class RegisterCommHook(pl.Callback):
        """Register gradsparse's hook on the DDP model the strategy built (CPU and CUDA)."""

        def __init__(self, state) -> None:
            self.state = state

        def on_fit_start(self, trainer, pl_module) -> None:
            trainer.strategy.model.register_comm_hook(self.state, gradsparse.ddp.hook)

    model = Classifier(make_net())
    alg = Algorithm(compressor=TopK(density=args.density, scope="layerwise", layout=gradsparse.ddp.layout_of(model)),
                    feedback="ef")
    state = gradsparse.ddp.SparsifiedState(model, alg, lr=args.lr)
    rank = int(os.environ.get("RANK", "0"))
    x, y = make_data(rank)
    trainer = pl.Trainer(
        accelerator="cpu", devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        strategy=DDPStrategy(process_group_backend="gloo"), callbacks=[RegisterCommHook(state)],
        max_steps=args.steps, use_distributed_sampler=False,  # each rank keeps its own shard
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    if args.out is not None and trainer.global_rank == 0:
        from gradsparse.experiments.tensorboard import hook_counters

        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({"params": {n: p.detach().clone() for n, p in model.net.named_parameters()},
                    "step": int(state.step), "counters": hook_counters(state)}, Path(args.out) / "result.pt")
        print(f"rank 0: {state.step} steps, counters {hook_counters(state)}")


if __name__ == "__main__":
    main()
