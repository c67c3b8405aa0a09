"""Small vmappable image classifiers (no dropout, no batch-norm running statistics) and the glue
that turns an ``nn.Module`` into a functional :class:`Task` (params = the module's named
parameters, forward via ``torch.func.functional_call``).

Inputs are images of shape [b, C, H, W]; every model flattens or convolves them itself.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ._common import count_params
from .base import Task


class MLP(nn.Module):
    """Flatten, then Linear-ReLU for each hidden width, then a Linear output layer."""

    def __init__(self, in_features: int, hidden: Sequence[int], n_classes: int):
        super().__init__()
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class SmallCNN(nn.Module):
    """Two blocks of conv(k x k, 'same' padding) - ReLU - maxpool(2), then an optional hidden
    Linear-ReLU layer and a Linear output layer. Spatial size after the blocks: H//4 x W//4."""

    def __init__(
        self,
        image_size: int,
        channels: Sequence[int],
        kernel_size: int,
        n_classes: int,
        hidden: int = 0,
        in_channels: int = 1,
    ):
        super().__init__()
        c1, c2 = channels
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size, padding=pad)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size, padding=pad)
        side = image_size // 4
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for two 2x2 poolings")
        flat = c2 * side * side
        self.fc = nn.Linear(flat, hidden) if hidden else None
        self.out = nn.Linear(hidden or flat, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        if self.fc is not None:
            x = F.relu(self.fc(x))
        return self.out(x)


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max pooling:
    conv1 (6 maps) - ReLU - maxpool 2 - conv2 (16 maps) - ReLU - maxpool 2 - fc 120 - ReLU -
    fc 84 - ReLU - fc n_classes.

    * 28x28 input (MNIST): conv1 5x5 with padding 2, conv2 5x5 without padding, so the flattened
      size is 16*5*5 = 400 and d = 61,706 (the LeNet of paper 001).
    * 8x8 input (sklearn digits), our adaptation: both convolutions 3x3 with padding 1, so the
      maps are 8x8 -> 4x4 -> 4x4 -> 2x2 and the flattened size is 16*2*2 = 64 (d = 19,754).
    """

    def __init__(self, image_size: int, n_classes: int = 10, in_channels: int = 1):
        super().__init__()
        if image_size == 28:
            k1, p1, k2, p2 = 5, 2, 5, 0
        elif image_size == 8:
            k1, p1, k2, p2 = 3, 1, 3, 1
        else:
            raise ValueError(f"LeNet supports image_size 28 or 8, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 6, k1, padding=p1)
        self.conv2 = nn.Conv2d(6, 16, k2, padding=p2)
        side = ((image_size + 2 * p1 - k1 + 1) // 2 + 2 * p2 - k2 + 1) // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.out = nn.Linear(84, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.out(x)


class MnistCNN(nn.Module):
    """Paper 003's MNIST CNN (d = 1,199,882 on 28x28), the network of PyTorch's classic MNIST
    example without its two dropout layers (dropout cannot run under the vmapped simulator):
    conv 1->32 3x3 - ReLU - conv 32->64 3x3 - ReLU - maxpool 2 - flatten (64*12*12 = 9,216) -
    fc 128 - ReLU - fc n_classes. Convolutions without padding; on an s x s input the flattened
    size is 64 * ((s - 4) // 2)^2 (8x8 digits: 256, d = 53,002)."""

    def __init__(self, image_size: int = 28, n_classes: int = 10, in_channels: int = 1):
        super().__init__()
        side = (image_size - 4) // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for MnistCNN (needs >= 6)")
        self.conv1 = nn.Conv2d(in_channels, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.out = nn.Linear(128, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.out(x)


class FashionCNN(nn.Module):
    """Paper 003's Fashion-MNIST CNN (d = 29,034 on 28x28). The thesis gives only the count; the
    layers are our reconstruction, the common two-block CNN of PyTorch tutorials that has
    exactly this count: conv 1->16 5x5 pad 2 - BatchNorm(16) - ReLU - maxpool 2 - conv 16->32
    5x5 pad 2 - BatchNorm(32) - ReLU - maxpool 2 - fc 32*7*7 -> n_classes
    (416 + 32 + 12,832 + 64 + 15,690 = 29,034; without the batch norms it is
    :class:`SmallCNN`'s 28,938).

    To stay vmappable the batch norms keep no running statistics
    (``track_running_stats=False``): they always normalise with the statistics of the batch they
    see (a worker's local batch in training, an evaluation chunk in testing); their affine
    scale and shift are ordinary parameters (initialised to 1 and 0)."""

    def __init__(self, image_size: int = 28, n_classes: int = 10, in_channels: int = 1):
        super().__init__()
        side = image_size // 4
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for two 2x2 poolings")
        self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=2)
        self.bn1 = nn.BatchNorm2d(16, track_running_stats=False)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.bn2 = nn.BatchNorm2d(32, track_running_stats=False)
        self.out = nn.Linear(32 * side * side, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.out(x.flatten(1))


def fashion_mlp(in_features: int = 784, n_classes: int = 10) -> MLP:
    """Paper 003's Fashion-MNIST MLP (d = 242,762 on 784 inputs). The thesis gives only the
    count; no MLP with one or two hidden layers has exactly it, and 784-256-128-64-10 with ReLU
    does (200,960 + 32,896 + 8,256 + 650), so that is our choice."""
    return MLP(in_features, (256, 128, 64), n_classes)


def init_module_params(module: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh parameters for ``module`` drawn from ``generator`` only (global RNG untouched).

    Same distribution as PyTorch's default init of Linear/Conv layers: weight and bias
    ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_features (or in_channels * k * k).
    Layers are drawn in ``named_parameters`` order, weight before bias. Batch-norm scale and
    shift start at 1 and 0 (PyTorch's default; nothing drawn)."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, mod in module.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            if mod.track_running_stats:
                raise TypeError(f"{mod_name}: batch norm with running statistics is not vmappable; "
                                "use track_running_stats=False")
            if mod.affine:
                out[f"{mod_name}.weight"] = torch.ones(mod.num_features)
                out[f"{mod_name}.bias"] = torch.zeros(mod.num_features)
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            for p_name, p in mod.named_parameters(recurse=False):
                u = torch.rand(p.shape, generator=generator, dtype=torch.float32)
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = (2.0 * u - 1.0) * bound
    names = [n for n, _ in module.named_parameters()]
    missing = set(names) - set(out)
    if missing:
        raise TypeError(f"init_module_params cannot initialise parameters {sorted(missing)}")
    return {n: out[n] for n in names}


def module_task(
    name: str,
    module: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor | None,
    test_y: torch.Tensor | None,
    info: dict | None = None,
) -> Task:
    """A cross-entropy classification task whose parameters are ``module``'s named parameters.

    ``loss(params, x, y) = cross_entropy(functional_call(module, params, (x,)), y)`` (mean over
    the batch); ``predict`` returns the logits. The module instance only supplies structure: its
    own parameter values are never used (``init_params`` draws new ones from the generator)."""
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)

    def init_params(generator: torch.Generator) -> dict[str, torch.Tensor]:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        return init_module_params(module, generator)

    def predict(params, x):
        return functional_call(module, params, (x,))

    def loss(params, x, y):
        return F.cross_entropy(functional_call(module, params, (x,)), y)

    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    full_info = {"d": count_params(dict(module.named_parameters())), "n_classes": int(module.out.out_features),
                 "input_shape": tuple(train_x.shape[1:]), "param_shapes": shapes,
                 "model": type(module).__name__}
    full_info.update(info or {})
    return Task(
        name=name,
        init_params=init_params,
        loss=loss,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        predict=predict,
        convex=False,
        info=full_info,
        module=module,
    )
