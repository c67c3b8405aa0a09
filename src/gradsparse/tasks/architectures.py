"""The papers' large models, built with plain PyTorch (batch norm with running statistics,
optional dropout): constructible, trainable with an ordinary optimiser loop and usable with the
``torch.distributed`` engine, but *not* meant for the vmapped simulator (whose models are in
:mod:`gradsparse.tasks.models`).

==========================  =========================================  ==============  =========
builder                     architecture                               parameters      paper
==========================  =========================================  ==============  =========
``resnet18_cifar()``        CIFAR ResNet-18, BasicBlocks [2, 2, 2, 2]  11,173,962      001, 002
``vgg19_cifar()``           VGG-19 with batch norm, Linear(512, 10)    20,040,522      003
``resnet110_cifar()``       He et al. 2016 ResNet-110, option A        1,727,962       000
``lstm_wikitext2()``        2-layer LSTM LM, vocab 33,278, 650 units   50,065,078      002
``lstm_wikitext2(tie)``     the same with tied embedding/decoder       28,434,378      002
``resnet_small_cifar()``    CIFAR ResNet, BasicBlocks [1, 1, 1, 1],    308,826         offline
                            widths 16..128
``resnet20_cifar()``        He et al. 2016 ResNet-20, option A         269,722         offline
``lstm_tiny()``             2-layer LSTM LM, vocab 100, 32 units       23,396          offline
==========================  =========================================  ==============  =========

:data:`ARCHITECTURES` maps a name to its builder and :func:`parameter_count` counts a built
model's parameters (``requires_grad`` ones, which is all of them here; batch-norm running
statistics are buffers and are not counted). :data:`PAPER_MODELS` lists every model the papers
train, these and the vmappable ones of :mod:`~gradsparse.tasks.models`, with the parameter
count each must have.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# CIFAR ResNets, the common "kuangliu/pytorch-cifar" layout (ResNet-18 of papers 001 and 002)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU.

    Convolutions have no bias. Shortcut when the shape changes (stride != 1 or new width):
    ``shortcut="B"``: 1x1 convolution (stride) + BN (ResNet-18's projection shortcut);
    ``shortcut="A"``: parameter-free, subsample by 2 and zero-pad the new channels (He et al.
    2016's CIFAR option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_kind = shortcut
        self.pad = 0
        self.stride = stride
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
            elif shortcut == "A":
                if planes < in_planes or (planes - in_planes) % 2:
                    raise ValueError(f"option-A shortcut needs an even width increase, got {in_planes}->{planes}")
                self.pad = (planes - in_planes) // 2
            else:
                raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut_kind == "A" and (self.stride != 1 or self.pad):
            sc = x[:, :, :: self.stride, :: self.stride]
            sc = F.pad(sc, (0, 0, 0, 0, self.pad, self.pad))
        else:
            sc = self.shortcut(x)
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem convolution (``width`` maps, stride 1, no max pool) +
    BN + ReLU, four stages of BasicBlocks with widths ``width * (1, 2, 4, 8)`` and strides
    (1, 2, 2, 2) (projection shortcuts), global average pooling, Linear(8 * width, n_classes).

    ``blocks=(2, 2, 2, 2), width=64`` is the CIFAR ResNet-18 (11,173,962 parameters)."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64, n_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        in_planes = width
        for i, n in enumerate(blocks):
            planes = width * 2**i
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=(1 if i == 0 or j > 0 else 2)))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.out = nn.Linear(in_planes, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.out(x)


def resnet18_cifar(n_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-18 (papers 001 and 002): stem conv3x3 3->64 + BN, BasicBlocks [2, 2, 2, 2]
    with widths 64/128/256/512, 1x1-conv projection shortcuts, global average pool, fc 512->10.
    11,173,962 parameters for 10 classes."""
    return CifarResNet((2, 2, 2, 2), 64, n_classes)


def resnet_small_cifar(n_classes: int = 10) -> CifarResNet:
    """Offline-sized CIFAR ResNet of the same layout as :func:`resnet18_cifar` with one
    BasicBlock per stage and widths 16/32/64/128 (308,826 parameters for 10 classes)."""
    return CifarResNet((1, 1, 1, 1), 16, n_classes)


class CifarResNetA(nn.Module):
    """He et al. (2016), section 4.2: the CIFAR ResNet of depth 6n + 2. Stem conv3x3 3->16 + BN
    + ReLU, three stages of n BasicBlocks with widths 16/32/64 (the first block of stages 2 and 3
    has stride 2), option-A identity shortcuts (parameter-free: subsample + zero channels),
    global average pooling, Linear(64, n_classes). n = 18: ResNet-110 (1,727,962 parameters);
    n = 3: ResNet-20 (269,722)."""

    def __init__(self, n: int = 18, n_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages = []
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            layers = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut="A"))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.out = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.out(x)


def resnet110_cifar(n_classes: int = 10) -> CifarResNetA:
    """ResNet-110 of paper 000 (He et al. 2016, 18 BasicBlocks per stage, option A):
    1,727,962 parameters for 10 classes."""
    return CifarResNetA(18, n_classes)


def resnet20_cifar(n_classes: int = 10) -> CifarResNetA:
    """ResNet-20 (He et al. 2016, 3 BasicBlocks per stage, option A), the offline-sized
    member of the ResNet-110 family: 269,722 parameters for 10 classes."""
    return CifarResNetA(3, n_classes)


# --------------------------------------------------------------------------------------------
# VGG-19 (paper 003)
# --------------------------------------------------------------------------------------------

VGG19_CONFIG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                       512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG for 32x32 inputs: for each entry of ``config`` a conv3x3 (padding 1, with bias) + BN +
    ReLU, or a 2x2 max pool for "M"; after five pools the map is 1x1, flattened to 512 features;
    classifier Linear(512, n_classes). :data:`VGG19_CONFIG` gives VGG-19 (20,040,522
    parameters for 10 classes)."""

    def __init__(self, config: Sequence = VGG19_CONFIG, n_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x).flatten(1))


def vgg19_cifar(n_classes: int = 10) -> VGG:
    """VGG-19 with batch norm for CIFAR-10 (paper 003; the widely used 'VGG19' configuration
    [64, 64, M, 128, 128, M, 256 x 4, M, 512 x 4, M, 512 x 4, M], classifier Linear(512, 10)):
    20,040,522 parameters for 10 classes."""
    return VGG(VGG19_CONFIG, n_classes)


# --------------------------------------------------------------------------------------------
# LSTM language model (paper 002, WikiText-2)
# --------------------------------------------------------------------------------------------


class LSTMLanguageModel(nn.Module):
    """Word-level language model: Embedding(vocab, emb) - dropout - n_layers-layer LSTM(emb ->
    hidden) - dropout - Linear(hidden, vocab) decoder; optionally the decoder weight is the
    embedding matrix (``tie_weights``, needs emb == hidden). Input token ids [seq, batch] (int64),
    output logits [seq, batch, vocab] (and the final LSTM state with ``return_state``).

    Parameters: vocab * emb + sum over layers of 4 * hidden * (in + hidden + 2) (PyTorch's LSTM
    has two bias vectors) + hidden * vocab + vocab, minus hidden * vocab when tied."""

    def __init__(self, vocab: int, emb: int, hidden: int, n_layers: int = 2, dropout: float = 0.0,
                 tie_weights: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, n_layers, dropout=dropout if n_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab)
        if tie_weights:
            if emb != hidden:
                raise ValueError(f"tie_weights needs emb == hidden, got {emb} and {hidden}")
            self.out.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor, state=None, return_state: bool = False):
        x = self.drop(self.embedding(tokens))
        y, state = self.lstm(x, state)
        logits = self.out(self.drop(y))
        return (logits, state) if return_state else logits


WIKITEXT2_VOCAB = 33_278


def lstm_wikitext2(tie_weights: bool = False, dropout: float = 0.5) -> LSTMLanguageModel:
    """Paper 002's LSTM on WikiText-2. The paper names the model and data set only; the sizes
    are our choice, PyTorch's word_language_model "medium" setting: WikiText-2's vocabulary of
    33,278 words, 650-dimensional embedding, 2 LSTM layers of 650 units, dropout 0.5.
    50,065,078 parameters (28,434,378 with ``tie_weights``)."""
    return LSTMLanguageModel(WIKITEXT2_VOCAB, 650, 650, 2, dropout, tie_weights)


def lstm_tiny(vocab: int = 100, tie_weights: bool = False) -> LSTMLanguageModel:
    """Offline-sized LSTM language model: vocabulary 100, embedding 32, 2 LSTM layers of 32
    units, no dropout: 23,396 parameters (20,196 tied)."""
    return LSTMLanguageModel(vocab, 32, 32, 2, 0.0, tie_weights)


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "vgg19_cifar": vgg19_cifar,
    "resnet110_cifar": resnet110_cifar,
    "lstm_wikitext2": lstm_wikitext2,
    "lstm_wikitext2_tied": lambda: lstm_wikitext2(tie_weights=True),
    "resnet_small_cifar": resnet_small_cifar,
    "resnet20_cifar": resnet20_cifar,
    "lstm_tiny": lstm_tiny,
}


def count_module_params(module: nn.Module) -> int:
    """Number of distinct trainable parameters of ``module`` (tied weights counted once)."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


# --------------------------------------------------------------------------------------------
# Every paper model with the parameter count the paper states (or we state, where it does not)
# --------------------------------------------------------------------------------------------


def _paper_models() -> dict[str, tuple[Callable[[], nn.Module], int, str]]:
    from .models import MLP, FashionCNN, LeNet, MnistCNN, fashion_mlp

    return {
        # name: (builder, parameter count, where the count comes from)
        "lenet_mnist": (lambda: LeNet(28), 61_706, "paper 001 (LeNet on MNIST)"),
        "resnet18_cifar": (resnet18_cifar, 11_173_962, "papers 001 and 002 (ResNet-18 on CIFAR-10)"),
        "resnet110_cifar": (resnet110_cifar, 1_727_962,
                            "paper 000 (ResNet-110 on CIFAR-10; He et al. 2016 state 1.7M, exact count ours)"),
        "lstm_wikitext2": (lstm_wikitext2, 50_065_078,
                           "paper 002 (LSTM on WikiText-2; sizes not stated in the paper, ours)"),
        "mlp_mnist": (lambda: MLP(784, (64,), 10), 50_890, "paper 003 (MLP 784-64-10 on MNIST)"),
        "cnn_mnist_paper003": (lambda: MnistCNN(28), 1_199_882, "paper 003 (CNN on MNIST)"),
        "cnn_fashion_paper003": (lambda: FashionCNN(28), 29_034,
                                 "paper 003 (CNN on Fashion-MNIST; count from the thesis, layers ours)"),
        "mlp_fashion_paper003": (lambda: fashion_mlp(784), 242_762,
                                 "paper 003 (MLP on Fashion-MNIST; count from the thesis, layers ours)"),
        "vgg19_cifar": (vgg19_cifar, 20_040_522,
                        "paper 003 (VGG-19 on CIFAR-10; the thesis gives no count, exact count ours)"),
    }


PAPER_MODELS: dict[str, tuple[Callable[[], nn.Module], int, str]] = _paper_models()
"""``name -> (builder, expected parameter count, source)`` for every model the papers train."""


def parameter_count(model_name: str) -> int:
    """Parameters of the model built by ``PAPER_MODELS[model_name]`` or ``ARCHITECTURES[...]``
    (counted on the built module, not taken from the table)."""
    if model_name in PAPER_MODELS:
        return count_module_params(PAPER_MODELS[model_name][0]())
    if model_name in ARCHITECTURES:
        return count_module_params(ARCHITECTURES[model_name]())
    raise ValueError(f"unknown model {model_name!r}; allowed: {sorted(set(PAPER_MODELS) | set(ARCHITECTURES))}")
