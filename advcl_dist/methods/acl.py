"""ACL (Jiang et al., NeurIPS 2020, "Robust Pre-Training by Adversarial Contrastive Learning"; authors' code
VITA-Group/Adversarial-Contrastive-Learning, train_simCLR.py), with the optional invariant regularisers
SIR/AIR of Xu et al. (NeurIPS 2023; GodXuxilie/Enhancing_ACL_via_AIR, pretraining.py) — see air.py.

ℓ(u, v) is SimCLR's NT-Xent of the pair (u, v) (losses.multiview_nt_xent with V = 2, global batch,
temperature t = 0.5; no extra scale factor), t1, t2 two SimCLR views of x, f_n / f_a the encoder +
projection through the `normal` / `pgd` BN branch. Variants (`acl.variant`, paper Sec. 3 and Fig. 1):

  a2a  δ1, δ2 = argmax ℓ(f_a(t1+δ1), f_a(t2+δ2)) jointly;  L = ℓ(f_a(t1+δ1), f_a(t2+δ2))   (one BN)
  a2s  δ1 = argmax ℓ(f_a(t1+δ1), f_n(t2));                   L = ℓ(f_a(t1+δ1), f_n(t2))     (dual BN)
  ds   δ1, δ2 as in a2a;  L = w_s·ℓ(f_n(t1), f_n(t2)) + w_a·ℓ(f_a(t1+δ1), f_a(t2+δ2))       (dual BN)
       [+ λ1·SIR + λ2·AIR, with f_n(x) of the un-augmented image x (Xu et al. 2023)]

Authors' code (ds, the only variant it trains): w_s = w_a = 1/2 (`loss = (nt_xent(features) +
nt_xent(features_adv))/2`); the attack `PGD_contrastive` perturbs both views jointly, 5 steps, ε 8/255,
step 2/255, uniform random start, through the `pgd` branch with the model in eval mode (BN running
statistics, nothing updated); the training forwards run in train mode, each pair as ONE BN batch (both
views' rows share the statistics: one forward per pair), as here. The README states that adversarial and
standard encoders share all weights but use separate BNs, hence dual BN for a2s too; a2a has only
adversarial views, so one BN. a2a/a2s are not in the released code: they follow the paper's description
with the ds conventions (eval-mode attack, t = 0.5).
The AIR code weights the two streams (1 − w)·L_nat + (1 + w)·L_adv with w = 0 for ACL, i.e. 1 and 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attacks import PGDResult, pgd, ramp
from ..data.augment import to_float
from ..losses import multiview_nt_xent
from .air import KL_FORMS, invariance_regularisers
from .base import Method, StepContext, StepOutput, bn_mode, register, register_variant
from .simclr import simclr_views

ACL_VARIANTS = ("a2a", "a2s", "ds")


@dataclass
class ACLSettings:
    """The `acl` config section (defaults: the authors' ACL-DS, train_simCLR.py --ACL_DS)."""

    variant: str = "ds"  # a2a | a2s | ds; README: "DS (our best solution)", the leaderboard's ACL
    temperature: float = 0.5  # nt_xent(x, t=0.5) in train_simCLR.py (and AIR_Loss(temperature=0.5))
    std_weight: float = 0.5  # ds: weight of ℓ(t1, t2); train_simCLR.py divides the sum of both losses by 2
    adv_weight: float = 0.5  # ds: weight of ℓ(t1+δ1, t2+δ2); likewise
    attack_bn_eval: bool = True  # PGD_contrastive runs `model.eval()`: BN uses running statistics
    sir_weight: float = 0.0  # λ1 of SIR (ds only; 0 = off); AIR repo pretraining.py --lambda1 default 0.5
    air_weight: float = 0.0  # λ2 of AIR (ds only; 0 = off); AIR repo pretraining.py --lambda2 default 0.5
    ir_kl_form: str = "paper"  # paper (KL as the AIR paper defines it) | authors_code (AIR.py's kl_div call)

    def check(self, need) -> None:
        need(self.variant in ACL_VARIANTS, "variant", f"{self.variant!r} is not one of {list(ACL_VARIANTS)}")
        need(self.temperature > 0, "temperature", "must be > 0")
        for name in ("std_weight", "adv_weight", "sir_weight", "air_weight"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.variant == "ds" or self.sir_weight == self.air_weight == 0, "variant",
             f"{self.variant!r} has no natural pair for SIR/AIR: set acl.variant=ds, or acl.sir_weight and "
             "acl.air_weight to 0")
        need(self.ir_kl_form in KL_FORMS, "ir_kl_form", f"{self.ir_kl_form!r} is not one of {list(KL_FORMS)}")


def pair_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent ℓ(z1, z2) of row-aligned projections [B, D] over the (global) batch."""
    return multiview_nt_xent(torch.stack([z1, z2], dim=1), temperature, gather=gather)


def original_image(images: torch.Tensor, size: int) -> torch.Tensor:
    """x itself (AIR's `ToTensor()` of the stored image), as float [0, 1] at the views' side."""
    x = to_float(images)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@register("acl", settings=ACLSettings)
class ACL(Method):
    branches = ("normal", "pgd")

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.settings.variant == "a2a":
            self.branches = ("normal",)  # adversarial views only: one BN serves them

    def describe(self) -> str:
        return f"acl ({self.settings.variant})"

    @property
    def uses_ir(self) -> bool:
        return self.settings.sir_weight > 0 or self.settings.air_weight > 0

    def attack(self, module, t1: torch.Tensor, t2: torch.Tensor, generator, share: float = 1.0) -> PGDResult:
        """The adversarial views: [t1+δ1; t2+δ2] (a2a, ds: both views attacked jointly) or t1+δ1 (a2s), each
        maximising the NT-Xent of the pair through `pgd` (a2s: against f_n(t2), computed once)."""
        s, a, b = self.settings, self.cfg.attack, t1.shape[0]

        def run(objective, x):
            return pgd(objective, x, a.eps * share, a.step_size * share, a.steps, a.random_start, generator)

        with bn_mode(module, s.attack_bn_eval):
            if s.variant == "a2s":
                with torch.no_grad():
                    z2 = module(t2, (("normal", b),))["proj"]
                return run(lambda x: pair_nt_xent(module(x, (("pgd", b),))["proj"], z2, s.temperature), t1)

            def both(x):
                z = module(x, (("pgd", 2 * b),))["proj"]
                return pair_nt_xent(z[:b], z[b:], s.temperature)

            return run(both, torch.cat([t1, t2]))

    def training_loss(self, model, t1, t2, x_adv, orig=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The variant's loss from ONE forward of all its inputs (module docstring) and its parts."""
        s, b = self.settings, t1.shape[0]
        if s.variant == "a2a":
            z = model(x_adv, (("pgd", 2 * b),))["proj"]
            loss = pair_nt_xent(z[:b], z[b:], s.temperature)
            return loss, {"loss_adv": loss}
        if s.variant == "a2s":
            z = model(torch.cat([x_adv, t2]), (("pgd", b), ("normal", b)))["proj"]
            loss = pair_nt_xent(z[:b], z[b:], s.temperature)
            return loss, {"loss_adv": loss}
        inputs, plan = [x_adv, t1, t2], [("pgd", 2 * b), ("normal", 2 * b)]
        if self.uses_ir:
            inputs.append(orig)
            plan.append(("normal", b))  # the authors' separate `model(ori_inputs, 'normal')` pass
        z = model(torch.cat(inputs), tuple(plan))["proj"]
        adv1, adv2, nat1, nat2 = z[:b], z[b:2 * b], z[2 * b:3 * b], z[3 * b:4 * b]
        loss_adv = pair_nt_xent(adv1, adv2, s.temperature)
        loss_std = pair_nt_xent(nat1, nat2, s.temperature)
        loss = s.std_weight * loss_std + s.adv_weight * loss_adv
        parts = {"loss_std": loss_std, "loss_adv": loss_adv}
        if self.uses_ir:
            sir, air = invariance_regularisers(nat1, nat2, adv1, adv2, s.temperature, gather=True,
                                               orig=z[4 * b:], kl_form=s.ir_kl_form)
            loss = loss + s.sir_weight * sir + s.air_weight * air
            parts.update(sir=sir, air=air)
        return loss, parts

    def training_step(self, ctx: StepContext) -> StepOutput:
        t1, t2 = simclr_views(ctx.images, ctx.random, self.cfg.views)
        share = ramp(ctx.step, ctx.steps_per_epoch, self.cfg.attack.eps_ramp_epochs)
        adv = self.attack(ctx.module, t1, t2, ctx.random, share)
        orig = original_image(ctx.images, self.cfg.views.size) if self.uses_ir else None
        loss, parts = self.training_loss(ctx.model, t1, t2, adv.x_adv, orig)
        metrics = {name: value.detach() for name, value in parts.items()}
        metrics["loss"] = loss.detach()
        # NT-Xent gained by all PGD steps but the last (pgd reports the loss at the last step's input; 0 for 1 step)
        metrics["attack_gain"] = adv.last_loss - adv.initial_loss
        return StepOutput(loss, metrics)


register_variant("acl_a2a", "acl", **{"acl.variant": "a2a"})
register_variant("acl_a2s", "acl", **{"acl.variant": "a2s"})
# ACL-AIR: the AIR repo's pretraining.py for ACL (--ACL_DS without --DynAug): (1 − 0)·L_nat + (1 + 0)·L_adv
# + λ1·SIR + λ2·AIR with its flag defaults λ1 = λ2 = 0.5 (the paper's own ACL values not verified here).
register_variant("acl_air", "acl", **{"acl.variant": "ds", "acl.std_weight": 1.0, "acl.adv_weight": 1.0,
                                      "acl.sir_weight": 0.5, "acl.air_weight": 0.5})

__all__ = ["ACL", "ACLSettings", "ACL_VARIANTS", "bn_mode", "original_image", "pair_nt_xent"]
