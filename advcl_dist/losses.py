"""Losses: multi-view NT-Xent (SupCon "all" form), the pseudo-label ensemble CE and the TRADES KL term.

Reductions run in float32 (float64 for float64 inputs) whatever the autocast dtype of the embeddings.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .distributed import gather_rows


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def multiview_nt_xent(z: torch.Tensor, temperature: float = 0.5, gather: bool = False) -> torch.Tensor:
    """Mean over all B·V anchors of −(1/(V−1)) Σ_positives log softmax over all other embeddings.

    `z` [B, V, D]: V views of B samples (L2-normalised here). The positives of an anchor are
    the other V−1 views of its sample. With `gather=True` under torch.distributed the
    contrast set is the global batch while anchors stay local (every rank must pass the
    same B), so the mean of per-rank losses equals the loss on the concatenated batch.
    """
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"z must be [B, V>=2, D], got {tuple(z.shape)}")
    with torch.autocast(z.device.type, enabled=False):  # the similarity matmul too stays fp32
        b, v, _ = z.shape
        anchors = F.normalize(_at_least_fp32(z), dim=-1).reshape(b * v, -1)
        contrast, offset = gather_rows(anchors) if gather else (anchors, 0)
        logits = anchors @ contrast.T / temperature
        rows = torch.arange(b * v, device=z.device)
        cols = torch.arange(contrast.shape[0], device=z.device)
        self_mask = cols[None, :] == (rows + offset)[:, None]
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = ((cols[None, :] // v) == ((rows + offset) // v)[:, None]) & ~self_mask
        pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1) / (v - 1)
        return -pos_log_prob.mean()


def pseudo_label_ce(logits: Sequence[torch.Tensor], labels: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Mean over the K heads of the cross-entropy against each head's pseudo-labels.

    `labels` [B, len(logits)]; rows equal to `ignore_index` do not count. A head whose
    labels are all ignored contributes 0 instead of NaN.
    """
    if labels.dim() != 2 or labels.shape[1] != len(logits):
        raise ValueError(f"labels must be [B, {len(logits)}] (one column per head), got {tuple(labels.shape)}")
    total = _at_least_fp32(logits[0].new_zeros(()))
    for k, head_logits in enumerate(logits):
        target = labels[:, k].long()
        summed = F.cross_entropy(_at_least_fp32(head_logits), target, ignore_index=ignore_index, reduction="sum")
        total = total + summed / (target != ignore_index).sum().clamp(min=1)
    return total / len(logits)


def trades_kl(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """TRADES robustness term: KL(p_clean || p_adv) summed over classes, averaged over the batch.

    Zhang et al. (2019) eq. (5); it is both the inner objective the attack maximises and, times β,
    the regulariser added to the clean cross-entropy.
    """
    log_p_adv = F.log_softmax(_at_least_fp32(logits_adv), dim=1)
    log_p_clean = F.log_softmax(_at_least_fp32(logits_clean), dim=1)
    return F.kl_div(log_p_adv, log_p_clean, reduction="batchmean", log_target=True)
