"""Encoder + linear classifier: what finetuning trains and evaluation attacks."""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """`encoder` (its BN fixed to one `branch`) followed by Linear(feat_dim, classes).

    Takes float images in [0, 1] and returns logits — the interface AutoAttack and
    `load_classifier` promise. A one-branch encoder ignores `branch`.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, branch: str = "pgd"):
        super().__init__()
        self.encoder = encoder
        self.branch = branch
        self.head = nn.Linear(encoder.feat_dim, num_classes)

    def features(self, x: torch.Tensor, views: int = 1) -> torch.Tensor:
        """Encoder features; `views` equal chunks of `x` get their own BN batch statistics in train mode."""
        return self.encoder(x, ((self.branch, x.shape[0] // views),) * views)

    def forward(self, x: torch.Tensor, views: int = 1) -> torch.Tensor:
        return self.head(self.features(x, views))
