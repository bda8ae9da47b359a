"""Projection head, pseudo-label heads and the AdvCL network that owns them."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .branch_bn import BranchBatchNorm, Plan


class ProjectionHead(nn.Module):
    """Linear → BN → ReLU → Linear; the BN is plain (one set of parameters) with per-view statistics."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn = BranchBatchNorm(hidden_dim, branches=("shared",), dims=1)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, h: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        """`plan` segments the views (its branch names are ignored: the BN has one branch)."""
        return nn.functional.normalize(self.fc2(torch.relu(self.bn(self.fc1(h), plan))), dim=1)


class AdvCLNet(nn.Module):
    """Encoder + projection head + one linear pseudo-label head per K.

    `forward(x, plan)` runs all views of `x` (concatenated along the batch, described by
    `plan`) in one pass and returns the encoder features, the L2-normalised projections
    (None without a projection head) and the pseudo-label logits (one tensor per K; an
    empty list when there are no heads). Supervised training uses one head, K = classes.
    """

    def __init__(self, encoder: nn.Module, proj_dim: int = 128, proj_hidden: int | None = None,
                 pseudo_ks: Sequence[int] = (), projector: bool = True):
        super().__init__()
        self.encoder = encoder
        self.feat_dim = encoder.feat_dim
        self.projector = ProjectionHead(self.feat_dim, proj_hidden or self.feat_dim, proj_dim) if projector else None
        self.pseudo_heads = nn.ModuleList(nn.Linear(self.feat_dim, k) for k in pseudo_ks)

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> dict[str, torch.Tensor | list | None]:
        h = self.encoder(x, plan)
        proj = self.projector(h, plan) if self.projector is not None else None
        return {"features": h, "proj": proj, "pseudo_logits": [head(h) for head in self.pseudo_heads]}
