"""Models: backbones with branch BatchNorm and the AdvCL heads."""
from __future__ import annotations

from collections.abc import Sequence

from .branch_bn import BRANCHES, BranchBatchNorm, views_plan
from .classifier import Classifier
from .heads import AdvCLNet, ProjectionHead
from .resnet import BACKBONES, CifarResNet

__all__ = ["BRANCHES", "BACKBONES", "AdvCLNet", "BranchBatchNorm", "CifarResNet", "Classifier", "ProjectionHead",
           "build_model", "views_plan"]


def build_model(arch: str = "resnet18", width: int = 64, branches: Sequence[str] = BRANCHES,
                proj_dim: int = 128, proj_hidden: int | None = None, pseudo_ks: Sequence[int] = (),
                projector: bool = True, init: str = "kaiming_fan_out") -> AdvCLNet:
    """`init`: the backbone's initialisation (model.init; resnet.INITS)."""
    if arch not in BACKBONES:
        raise ValueError(f"model.arch={arch!r} is not known; choose one of {sorted(BACKBONES)}")
    encoder = BACKBONES[arch](width, tuple(branches), init=init)
    return AdvCLNet(encoder, proj_dim, proj_hidden, tuple(pseudo_ks), projector)
