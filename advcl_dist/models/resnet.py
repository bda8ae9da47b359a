"""Backbones with branch BatchNorm: CIFAR ResNet-18 (any width) and torchvision ResNet-50.

The CIFAR variant has a 3×3 stride-1 stem and no max-pool, as in the AdvCL code;
inputs are raw [0, 1] images (no normalisation layer), as the authors' model.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torchvision
from torch import nn

from .branch_bn import BRANCHES, BranchBatchNorm


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs; `width` is the first stage's channels (64 = ResNet-18)."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64, branches=BRANCHES, in_channels=3):
        super().__init__()
        norm = partial(BranchBatchNorm, branches=branches)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = norm(width)
        layers, planes_in = [], width
        for stage, n in enumerate(blocks):
            planes = width * 2**stage
            for b in range(n):
                layers.append(BasicBlock(planes_in, planes, 2 if stage > 0 and b == 0 else 1, norm))
                planes_in = planes
        self.layers = nn.Sequential(*layers)
        self.feat_dim = planes_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)


def resnet50(branches=BRANCHES) -> nn.Module:
    """torchvision's ResNet-50 (ImageNet-size inputs) with branch BN and the classifier removed."""
    net = torchvision.models.resnet50(weights=None, norm_layer=partial(BranchBatchNorm, branches=branches))
    net.feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


BACKBONES = {
    "resnet18": lambda width, branches: CifarResNet((2, 2, 2, 2), width, branches),
    "resnet34": lambda width, branches: CifarResNet((3, 4, 6, 3), width, branches),
    "resnet50": lambda width, branches: resnet50(branches),
}
