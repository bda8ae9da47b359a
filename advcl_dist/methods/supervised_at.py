"""Supervised adversarial training (Madry et al.): the "Supervised" baseline row of the AdvCL tables.

The same encoder with a linear classifier (one head, K = number of classes, no projection
head), trained only on PGD examples (attack.supervised_steps, PGD-10 by default) of the
lightly augmented view x with the true labels. Its encoder is then finetuned and evaluated
through the same SLF / ALF / AFF path as the self-supervised methods.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..attacks import pgd, ramp
from ..config import ConfigError
from ..data.augment import crop_flip_view
from ..engine.objective import DataFacts
from ..models import AdvCLNet, build_model
from .base import Method, StepContext, StepOutput, register


@register("supervised_at")
class SupervisedAT(Method):
    branches = ("pgd",)
    needs = frozenset({"labels"})

    def bind(self, facts: DataFacts, device) -> None:
        super().bind(facts, device)
        cfg = self.cfg
        if not facts.num_classes or "unlabeled" in cfg.data.split:
            # Checked here, once: a per-step check of the labels would make the host wait for the GPU.
            raise ConfigError(f"train.method=supervised_at needs a label for every training image; "
                              f"data.split={cfg.data.split} of {cfg.data.name} has unlabelled images. "
                              "Pick a labelled split (e.g. data.split=train).")

    def build_model(self) -> AdvCLNet:
        m = self.cfg.model
        return build_model(m.arch, m.width, self.branches, pseudo_ks=(self.num_classes,), projector=False,
                           init=m.init)

    def training_step(self, ctx: StepContext) -> StepOutput:
        attack_model, model, labels = ctx.module, ctx.model, ctx.labels
        v, a, b = self.cfg.views, self.cfg.attack, ctx.images.shape[0]
        x = crop_flip_view(ctx.images, ctx.random, size=v.size, padding=v.padding)
        plan = (("pgd", b),)

        def objective(x_adv):
            return F.cross_entropy(attack_model(x_adv, plan)["pseudo_logits"][0], labels)

        share = ramp(ctx.step, ctx.steps_per_epoch, a.eps_ramp_epochs)
        adv = pgd(objective, x, a.eps * share, a.step_size * share, a.supervised_steps, a.random_start, ctx.random)
        logits = model(adv.x_adv, plan)["pseudo_logits"][0]
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean() * 100
        return StepOutput(loss, {"loss": loss.detach(), "adv_accuracy": accuracy})
