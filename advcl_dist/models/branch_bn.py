"""Batch normalisation with named branches and per-segment batch statistics.

AdvCL keeps separate BN statistics for clean views (`normal`), the contrastive
adversarial view (`pgd`) and the pseudo-label adversarial view (`pgd_ce`). To run
several views in ONE forward pass (one backward, DDP-friendly) the views are
concatenated along the batch and a *plan* — a sequence of ``(branch, rows)`` —
tells every BN layer which rows form one view. The plan is an argument of every
forward down to the BN layers (no state on the modules), so nested or concurrent
forwards with different plans cannot see each other's. Each segment is normalised with its
own batch statistics and its branch's affine parameters and running buffers, so the
result (outputs, gradients and running-stat updates) equals separate forwards.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Plan = Sequence[tuple[str, int]]

BRANCHES = ("normal", "pgd", "pgd_ce")


class BranchBatchNorm(nn.Module):
    """One BatchNorm per branch; a single branch serves every name (plain BN with per-view stats)."""

    def __init__(self, num_features: int, branches: Sequence[str] = BRANCHES, dims: int = 2, **bn_kwargs):
        super().__init__()
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
        self.bns = nn.ModuleDict({name: bn(num_features, **bn_kwargs) for name in branches})

    def branch(self, name: str) -> nn.Module:
        if len(self.bns) == 1:
            return next(iter(self.bns.values()))
        if name not in self.bns:
            raise KeyError(f"unknown BN branch {name!r}; this model has {list(self.bns)}")
        return self.bns[name]

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        """`plan`: the ``(branch, rows)`` segments of `x` in order; None is one `normal` segment."""
        plan = plan or (("normal", x.shape[0]),)
        if len(plan) == 1:
            return self.branch(plan[0][0])(x)
        sizes = [rows for _, rows in plan]
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"BN plan covers {sum(sizes)} rows but the batch has {x.shape[0]}")
        parts = x.split(sizes)
        return torch.cat([self.branch(name)(part) for (name, _), part in zip(plan, parts)])


def views_plan(branches: Sequence[str], rows_per_view: int) -> tuple[tuple[str, int], ...]:
    """Plan for equally sized views concatenated in order, one BN branch each."""
    return tuple((name, rows_per_view) for name in branches)
