"""SimCLR: two augmented views, NT-Xent. Our f_pre and the "no robustness" baseline."""
from __future__ import annotations

import torch

from ..data.augment import simclr_view
from ..models import views_plan
from ..rng import StepRandom
from .base import Method, StepContext, StepOutput, register, split_views


def simclr_views(images: torch.Tensor, generator: StepRandom, views_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """t1(x), t2(x): two independent SimCLR augmentations of the batch, made on its device."""
    v = views_cfg
    kwargs = dict(size=v.size, scale=(v.crop_scale_min, 1.0), jitter=(v.brightness, v.contrast, v.saturation, v.hue),
                  jitter_p=v.jitter_p, gray_p=v.gray_p)
    return simclr_view(images, generator, **kwargs), simclr_view(images, generator, **kwargs)


@register("simclr")
class SimCLR(Method):
    branches = ("normal",)

    def training_step(self, ctx: StepContext) -> StepOutput:
        t1, t2 = simclr_views(ctx.images, ctx.random, self.cfg.views)
        b = ctx.images.shape[0]
        out = ctx.model(torch.cat([t1, t2]), views_plan(("normal", "normal"), b))
        loss = self.contrastive(split_views(out["proj"], 2))
        return StepOutput(loss, {"loss": loss.detach(), "loss_con": loss.detach()})
