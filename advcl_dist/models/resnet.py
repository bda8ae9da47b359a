"""Backbones with branch BatchNorm: CIFAR ResNet-18 (any width) and torchvision ResNet-50.

The CIFAR variant has a 3×3 stride-1 stem and no max-pool, as in the AdvCL code;
inputs are raw [0, 1] images (no normalisation layer), as the authors' model.
Every forward takes the BN plan (see `branch_bn`) and hands it to each BN layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from .branch_bn import BRANCHES, BranchBatchNorm, Plan

if TYPE_CHECKING:
    import torchvision

INITS = ("kaiming_fan_out", "torch")  # model.init


def init_backbone(module: nn.Module, init: str = "kaiming_fan_out") -> nn.Module:
    """(Re)initialise every convolution and BatchNorm of `module` in place; returns it.

    kaiming_fan_out: conv weights ~ N(0, 2 / fan_out), fan_out = out_channels·kh·kw (He et al. 2015, mode
    fan_out, gain √2 for ReLU), BN weight 1 and bias 0 — the loop at the end of ResNet.__init__ in the authors'
    models/resnet_cifar_multibn_ensembleFC.py (LijieFan/AdvCL), the same as torchvision's ResNet.
    torch: each layer's own reset_parameters (PyTorch's default: conv weights kaiming-uniform with a = √5).
    Linear layers are left as built in both (the authors' loop does not touch them either).
    """
    if init not in INITS:
        raise ValueError(f"model.init={init!r} is not one of {list(INITS)}")
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if init == "torch":
                m.reset_parameters()
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class Shortcut(nn.Sequential):
    """Identity when empty, else (conv, BN): a Sequential so the keys stay `shortcut.0.*`, `shortcut.1.*`."""

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        if len(self) == 0:
            return x
        conv, bn = self
        return bn(conv(x), plan)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut = Shortcut()
        if stride != 1 or in_planes != planes:
            self.shortcut = Shortcut(nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x), plan))
        out = self.bn2(self.conv2(out), plan)
        return torch.relu(out + self.shortcut(x, plan))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs; `width` is the first stage's channels (64 = ResNet-18)."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64, branches=BRANCHES, in_channels=3,
                 init: str = "kaiming_fan_out"):
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
        self.layers = nn.Sequential(*layers)  # a container only: forward walks it with the plan
        self.feat_dim = planes_in
        if init != "torch":  # "torch": the weights as the layers were built (the same random draws as always)
            init_backbone(self, init)

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x), plan))
        for block in self.layers:
            out = block(out, plan)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)


class BranchResNet50(nn.Module):
    """torchvision's ResNet-50 modules (no fc) under the same names, run by a forward that passes the plan.

    torchvision's own forward calls each BN with one tensor, so this module adopts the stem, the four
    stages of Bottleneck blocks and the pool of a torchvision ResNet-50, and walks them itself. Adopting
    (not wrapping) keeps the state_dict keys those of torchvision's model: `conv1.weight`,
    `layer1.0.downsample.1.bns.normal.weight`, ...
    """

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        for name in ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
            self.add_module(name, getattr(net, name))
        self.feat_dim = net.fc.in_features
        import torchvision

        for block in self.blocks():  # fail here, not mid-training, if torchvision's layout ever changes
            if not isinstance(block, torchvision.models.resnet.Bottleneck):
                raise TypeError(f"expected torchvision Bottleneck blocks, got {type(block).__name__}")
            if block.downsample is not None and len(block.downsample) != 2:
                raise TypeError("expected a (conv, norm) downsample in torchvision's Bottleneck")

    def blocks(self):
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            yield from stage

    @staticmethod
    def bottleneck(block: nn.Module, x: torch.Tensor, plan: Plan | None) -> torch.Tensor:
        out = torch.relu(block.bn1(block.conv1(x), plan))
        out = torch.relu(block.bn2(block.conv2(out), plan))
        out = block.bn3(block.conv3(out), plan)
        if block.downsample is not None:
            conv, bn = block.downsample
            x = bn(conv(x), plan)
        return torch.relu(out + x)

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        out = self.maxpool(torch.relu(self.bn1(self.conv1(x), plan)))
        for block in self.blocks():
            out = self.bottleneck(block, out, plan)
        return torch.flatten(self.avgpool(out), 1)


def resnet50(branches=BRANCHES, init: str = "kaiming_fan_out") -> nn.Module:
    """torchvision's ResNet-50 (ImageNet-size inputs) with branch BN and the classifier removed.

    torchvision's constructor already initialises it as kaiming_fan_out does (its ResNet.__init__ runs the
    same loop, and reaches the BatchNorm2d inside each BranchBatchNorm); init="torch" resets the convs to
    PyTorch's defaults instead."""
    import torchvision  # here, not at import: it costs ~2 s of every process's start-up

    net = BranchResNet50(torchvision.models.resnet50(weights=None, norm_layer=partial(BranchBatchNorm,
                                                                                       branches=branches)))
    return init_backbone(net, init) if init != "kaiming_fan_out" else net


# (width, branches, init=model.init) → backbone
BACKBONES = {
    "resnet18": lambda width, branches, init="kaiming_fan_out": CifarResNet((2, 2, 2, 2), width, branches, init=init),
    "resnet34": lambda width, branches, init="kaiming_fan_out": CifarResNet((3, 4, 6, 3), width, branches, init=init),
    "resnet50": lambda width, branches, init="kaiming_fan_out": resnet50(branches, init),
}
