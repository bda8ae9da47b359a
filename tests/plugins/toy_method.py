"""A toy pretraining method written against the public plug-in API only (tests/test_plugins.py).

Two crop+flip views, their projections pulled together (no negatives: it would collapse in a long run,
which does not matter for a test). Its own config section `toy` (a scale), a hook that counts epochs
and an extra parameter group with its own learning rate.
"""
from dataclasses import dataclass

import torch

from advcl_dist.data.augment import crop_flip_view
from advcl_dist.methods import Method, StepContext, StepOutput, register


@dataclass
class ToySettings:
    scale: float = 1.0  # multiplies the loss
    head_lr: float = 0.05  # lr of the projection head's parameter group

    def check(self, need) -> None:
        need(self.scale > 0, "scale", "must be > 0")


@register("toy", settings=ToySettings)
class Toy(Method):
    branches = ("normal",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.epochs_started = 0

    def param_groups(self, model):
        head = list(model.projector.parameters())
        ids = {id(p) for p in head}
        return [{"params": [p for p in model.parameters() if id(p) not in ids]},
                {"params": head, "lr": self.settings.head_lr}]

    def on_epoch_start(self, ctx) -> None:
        self.epochs_started += 1

    def state_dict(self) -> dict:
        return {"epochs_started": self.epochs_started}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_started = state.get("epochs_started", 0)

    def training_step(self, ctx: StepContext) -> StepOutput:
        v, b = self.cfg.views, ctx.images.shape[0]
        views = [crop_flip_view(ctx.images, ctx.random, size=v.size, padding=v.padding) for _ in range(2)]
        z = ctx.model(torch.cat(views), (("normal", b), ("normal", b)))["proj"]
        loss = self.settings.scale * (1 - (z[:b] * z[b:]).sum(1)).mean()
        return StepOutput(loss, {"loss": loss.detach(), "epochs_started": torch.tensor(float(self.epochs_started))})
