"""SimCLR: two augmented views, NT-Xent. Our f_pre and the "no robustness" baseline."""
from __future__ import annotations

import torch

from ..data.augment import batch_views
from ..models import views_plan
from ..rng import StepRandom
from .base import Method, StepContext, StepOutput, register, split_views


def view_settings(views_cfg) -> dict:
    """The `views` config section as keyword arguments of data.augment.batch_views."""
    v = views_cfg
    return dict(size=v.size, padding=v.padding, scale=(v.crop_scale_min, 1.0),
                jitter=(v.brightness, v.contrast, v.saturation, v.hue), jitter_p=v.jitter_p, gray_p=v.gray_p)


def simclr_views(images: torch.Tensor, generator: StepRandom, views_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """t1(x), t2(x): two independent SimCLR augmentations of the batch, drawn and made together on its device."""
    t1, t2 = batch_views(images, generator, crop=False, simclr=2, **view_settings(views_cfg))
    return t1, t2


@register("simclr")
class SimCLR(Method):
    branches = ("normal",)

    def training_step(self, ctx: StepContext) -> StepOutput:
        t1, t2 = simclr_views(ctx.images, ctx.random, self.cfg.views)
        b = ctx.images.shape[0]
        out = ctx.model(torch.cat([t1, t2]), views_plan(("normal", "normal"), b))
        loss = self.contrastive(split_views(out["proj"], 2))
        return StepOutput(loss, {"loss": loss.detach(), "loss_con": loss.detach()})
