"""f_pre features of the whole unlabelled training set, in dataset-index order."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ordered_batches
from ..models import set_plan


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset, batch_size: int, image_size: int | None,
                     device: torch.device, branch: str = "normal") -> torch.Tensor:
    """L2-normalised encoder features [N, D] (float32, on the CPU) of un-augmented images, row i = index i.

    The encoder runs in eval mode (running BN statistics of `branch`), so a row does not
    depend on which other images share its batch.
    """
    encoder.eval()
    rows = []
    for x, _ in ordered_batches(dataset, batch_size, image_size, device):
        set_plan(encoder, ((branch, x.shape[0]),))
        try:
            rows.append(F.normalize(encoder(x).float(), dim=1).cpu())
        finally:
            set_plan(encoder, None)
    return torch.cat(rows)
