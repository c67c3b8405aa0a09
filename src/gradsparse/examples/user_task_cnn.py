"""Your own model and data in gradsparse: a small CNN on scikit-learn's 8x8 digits, as tensors.

gradsparse calls ``make_task(seed=..., **task.options)`` and trains what it returns on any engine:

    gradsparse run user_task_cnn                              # the shipped config that names this file
    gradsparse run digits_mlp_topk --set task.name=examples/user_task_cnn.py:make_task \\
        --set task.options.channels=4 --set workers.count=8   # any config, this task
    gradsparse launch user_task_cnn --nproc 4                 # 4 processes (engine: torch)

The contract (README, "Your own model and data"): return a dict with ``model`` (an nn.Module; its
parameters as built are the initial model), ``loss`` ((outputs, targets) -> mean loss; default
cross-entropy), ``train`` ((inputs, targets) tensors or a Dataset of pairs) and optionally
``test``, ``f_star`` and ``info``. gradsparse seeds torch's random generator with ``seed`` while
this function runs, so the CNN's default initialisation below is fixed by the run's seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class SmallCNN(nn.Module):
    """conv 3x3 (1 -> c) - ReLU - maxpool 2 - conv 3x3 (c -> 2c) - ReLU - maxpool 2 - Linear(8c -> 10):
    8x8 images become 4x4, then 2x2 maps (d = 1,898 for c = 8)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.classifier = nn.Linear(2 * channels * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.classifier(x.flatten(1))


def make_task(*, seed: int, channels: int = 8, test_fraction: float = 0.2) -> dict:
    """scikit-learn's 1,797 digits as [n, 1, 8, 8] tensors in [0, 1] with int64 labels; a random
    test split of ``test_fraction`` drawn from ``seed``; the CNN with ``channels`` first maps."""
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return {
        "model": SmallCNN(channels),
        "loss": F.cross_entropy,
        "train": TensorDataset(images[train], labels[train]),
        "test": (images[test], labels[test]),
    }
