"""SyncBN: BatchNorm statistics over the batch of every rank (`train.sync_bn=true`).

On GPUs this is torch's `nn.SyncBatchNorm` (fused kernels). torch's version refuses CPU tensors, so
on CPU (gloo) the same statistics are computed by `GlobalBatchNorm`: per-rank mean and centred
sum of squares, gathered with autograd and merged exactly (Chan et al.'s parallel variance), which
also makes a CPU run with several ranks match one process on the concatenated batch.
Either way the per-view segments of `BranchBatchNorm` stay separate: each view is normalised with the
statistics of that view over all ranks.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..distributed import gather_rows, world_size


def global_batch_norm(x: torch.Tensor, bn: _BatchNorm) -> torch.Tensor:
    """Training-mode batch norm of `x` [N, C, ...] with the statistics of all ranks' `x` (autograd through them)."""
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics never below fp32
    count = x.numel() // channels
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    local = torch.cat([mean, var * count, xf.new_full((1,), count)])
    stats, _ = gather_rows(local[None])
    means, m2s, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, 2 * channels:]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (m2s + counts * (means - mean) ** 2).sum(0) / total
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
            unbiased = var.detach() * total / (total - 1).clamp(min=1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    shape = (1, channels) + (1,) * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm of any rank ≥ 2 input whose training statistics span all ranks (plain BN when alone or in eval)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and world_size() > 1:
            return global_batch_norm(x, self)
        return super().forward(x)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` made synchronous over ranks; parameters and buffers are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global(module)


def _to_global(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats).to(next(module.buffers(), torch.empty(0)).device)
        bn.load_state_dict(module.state_dict())
        if module.affine:  # the same Parameters, as torch's conversion keeps them: frozen ones stay frozen
            bn.weight, bn.bias = module.weight, module.bias
        return bn.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _to_global(child))
    return module
