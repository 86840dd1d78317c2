"""Models for 28x28 (or other small square) grey images, registered by name for ``nmsparse train``.

* ``resnet``: a CIFAR-style ResNet (He et al. 2016, section 4.2) sized for a CPU: a 3x3 stem, then
  three stages of basic blocks at 16, 32 and 64 channels (stride 2 between stages), global average
  pooling and a linear classifier. Every inner conv has a multiple of 16 input channels, so every
  N:M from 2:4 to 8:16 fits in both layouts.
* ``resnet20``: the same with 3 blocks per stage (the CIFAR ResNet-20); slower.
* ``mlp``: flatten, two hidden layers of 256 with ReLU, linear classifier.
* ``vit``: a small vision transformer: 4x4 patch embedding (a strided conv), learned position
  embedding, pre-norm blocks of multi-head self-attention (``nn.Linear`` q/k/v and output
  projections) and a GELU MLP, mean pooling, linear classifier.

The first weight layer (stem / patch embedding / first Linear) and the classifier are the layers
:func:`nmsparse.sparsify` keeps dense by default, as in the SR-STE paper.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem conv, ``len(widths)`` stages of ``blocks`` basic blocks, pool, fc."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 1) -> None:
        super().__init__()
        if any(w % 16 for w in widths):
            raise ValueError(f"ResNet widths must be multiples of 16 (so 2:4 .. 8:16 fit), got {widths}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stage = [BasicBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(blocks)]
            layers.append(nn.Sequential(*stage))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 256, depth: int = 2) -> None:
        super().__init__()
        dims = [in_features] + [hidden] * depth
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.Linear`` q, k, v and output projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small vision transformer (patch embedding, attention and MLP blocks, mean pooling)."""

    def __init__(self, image_size: int = 28, in_channels: int = 1, num_classes: int = 10, patch: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


def _resnet(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    return ResNet(in_channels, num_classes, blocks=1)


def _resnet20(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    return ResNet(in_channels, num_classes, blocks=3)


def _mlp(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    return MLP(in_channels * image_size * image_size, num_classes)


def _vit(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    patch = 4 if image_size % 4 == 0 else (2 if image_size % 2 == 0 else 1)
    return ViT(image_size, in_channels, num_classes, patch=patch)


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "resnet": _resnet,
    "resnet20": _resnet20,
    "mlp": _mlp,
    "vit": _vit,
}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(name: str, *, image_size: int = 28, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A fresh model from the registry (uses the global torch RNG for its initialisation)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](image_size, in_channels, num_classes)
