"""DynACL (Luo, Wang & Wang, ICLR 2023, "Rethinking the Effect of Data Augmentation in Adversarial Contrastive
Learning"; authors' code PKU-ML/DYNACL, train_DynACL.py), with the optional SIR/AIR regularisers of Xu et al.
(NeurIPS 2023; GodXuxilie/Enhancing_ACL_via_AIR, pretraining.py --ACL_DS --DynAug) and DynACL++'s
post-processing (methods/lpaff.py).

ACL's dual stream (dual BN: `normal` for the clean pair, `pgd` for the adversarial pair) with two changes,
both driven by the 0-based epoch e of E, and the augmentation period K (the authors' reload frequency):

  augmentation strength   μ(e) = 1 − ⌊e / K⌋ · K / E       (train_DynACL.py: at 1-based epoch n, reloaded when
                                                           n % K == 1, strength = 1 − (n − 1) / E)
  views at strength μ     RandomResizedCrop(scale = (1 − (1 − s_min)·μ, 1)), ColorJitter(μ·(b, c, s, h)) with
                          p = μ·p_jitter, RandomGrayscale(p = μ·p_gray), flip 0.5 (unchanged); the authors'
                          s_min = 0.1, (b, c, s, h) = (0.4, 0.4, 0.4, 0.1), p = 0.8, 0.2 (reload(), get_transform())
  stream weight           w(e) = min(λ · (1 − μ(e)), 1),  λ = 2/3
  loss                    L = c · [(1 − w)·ℓ(f_n(t1), f_n(t2)) + (1 + w)·ℓ(f_a(t1+δ1), f_a(t2+δ2))]
                              + λ1·SIR + λ2·AIR

ℓ is SimCLR's NT-Xent (temperature 0.5) over the global batch, δ1, δ2 maximise ℓ(f_a(t1+δ1), f_a(t2+δ2))
jointly (PGD through `pgd` with the network in eval mode, as the authors' PGD_contrastive), and c = 1/2
(train_DynACL.py: `(nt_xent(features)·(2 − weight_adv) + nt_xent(features_adv)·weight_adv) / 2`, weight_adv
= 1 + w). The AIR code uses c = 1 (AIR.py: `nat·(1 − weight) + adv·(1 + weight) + λ1·SIR + λ2·AIR`), hence
`stream_scale`. Where the authors' code differs from this (not copied): train_DynACL.py computes w from the
1-based epoch n as λ·⌊n / K⌋·K / E, one epoch ahead of μ at the last epoch of every period (the AIR and
RCS reimplementations, GodXuxilie/RobustSSL_Benchmark DynACL.py, tie it to μ as here); and it encodes the
second view of every pair with a momentum (EMA, m = 0.99) copy of the encoder and evaluates that copy
(resnet18_momentum, `swap=True`), which neither reimplementation has (whether the paper describes it is not
verified here). The formulas above are the code's; the paper's own notation was not available to check.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attacks import PGDResult, pgd, ramp
from ..data.augment import batch_views
from ..losses import multiview_nt_xent
from .acl import original_image
from .air import KL_FORMS, invariance_regularisers
from .base import Method, PostProcess, StepContext, StepOutput, register, register_variant
from .simclr import view_settings


def augmentation_strength(epoch: int, epochs: int, period: int) -> float:
    """μ(e) = 1 − ⌊e / K⌋ · K / E for the 0-based `epoch` e of `epochs` E, period K: 1 in the first period,
    lowered by K / E at the start of every later one (train_DynACL.py's `strength` at each reload)."""
    return 1.0 - (epoch // period) * period / epochs


def adversarial_weight(strength: float, rate: float) -> float:
    """w = min(λ·(1 − μ), 1): the share moved from the clean to the adversarial stream (λ = `rate`; the
    authors' `min(weight_adv, 2)` cap is the 1 here)."""
    return min(rate * (1.0 - strength), 1.0)


def strength_view_settings(strength: float, views_cfg) -> dict:
    """batch_views kwargs of the views at `strength` μ: cfg.views at μ = 1, the authors' weakest setting at
    μ = 0 (a full-image crop, flip only: no colour jitter, no grayscale). Crop scale (1 − (1 − s_min)·μ, 1),
    jitter strengths, jitter and grayscale probabilities times μ (train_DynACL.py reload())."""
    base = view_settings(views_cfg)
    scale_min = base["scale"][0]
    return {**base, "scale": (min(1.0, scale_min + (1.0 - scale_min) * (1.0 - strength)), 1.0),
            "jitter": tuple(j * strength for j in base["jitter"]),
            "jitter_p": base["jitter_p"] * strength, "gray_p": base["gray_p"] * strength}


def dynacl_loss(nat1: torch.Tensor, nat2: torch.Tensor, adv1: torch.Tensor, adv2: torch.Tensor, weight: float,
                temperature: float, stream_scale: float = 0.5, sir_weight: float = 0.0, air_weight: float = 0.0,
                orig: torch.Tensor | None = None, kl_form: str = "paper", gather: bool = True
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """c·[(1 − w)·ℓ(nat1, nat2) + (1 + w)·ℓ(adv1, adv2)] + λ1·SIR + λ2·AIR (module docstring) from the
    projections [B, D] of the clean views, their adversarial counterparts and, for SIR/AIR, the un-augmented
    image (`orig`). Returns the loss and its parts."""
    loss_nat = multiview_nt_xent(torch.stack([nat1, nat2], dim=1), temperature, gather=gather)
    loss_adv = multiview_nt_xent(torch.stack([adv1, adv2], dim=1), temperature, gather=gather)
    loss = stream_scale * ((1.0 - weight) * loss_nat + (1.0 + weight) * loss_adv)
    parts = {"loss_nat": loss_nat, "loss_adv": loss_adv}
    if sir_weight > 0 or air_weight > 0:
        sir, air = invariance_regularisers(nat1, nat2, adv1, adv2, temperature, gather, orig=orig, kl_form=kl_form)
        loss = loss + sir_weight * sir + air_weight * air
        parts.update(sir=sir, air=air)
    return loss, parts


@dataclass
class DynACLSettings:
    """The `dynacl` config section (defaults: the authors' train_DynACL.py)."""

    period: int = 50  # K: --reload_frequency 50 (also K = 50 in the AIR repo's pretraining.py)
    weight_rate: float = 2 / 3  # λ of w = λ·(1 − μ): --swap_param 2/3 (LAMBDA = 2/3 in the AIR/RCS code)
    temperature: float = 0.5  # nt_xent(x, t=0.5) in utils.py
    stream_scale: float = 0.5  # c: train_DynACL.py halves the two streams' sum; AIR.py does not (1.0)
    sir_weight: float = 0.0  # λ1 of SIR (0 = off); AIR repo run.sh / pretraining.py --lambda1 0.5 for DynACL-AIR
    air_weight: float = 0.0  # λ2 of AIR (0 = off); likewise --lambda2 0.5
    ir_kl_form: str = "paper"  # paper | authors_code (AIR.py's kl_div call; see methods/air.py)
    post: bool = False  # DynACL++: cluster this encoder's features, then run `lpaff` from its checkpoint
    # Ks of that clustering (lpaff trains on the first): assign_label.py clusters into 10 for every dataset
    # (`for num_clusters in [10]`, CIFAR-100 and STL-10 included), on the `normal` route's features.
    post_ks: list[int] = field(default_factory=lambda: [10])

    def check(self, need) -> None:
        need(self.period >= 1, "period", "must be >= 1 (epochs between strength changes)")
        need(0 <= self.weight_rate <= 1, "weight_rate", "must be in [0, 1] (λ; the clean weight 1 − λ·(1 − μ) "
             "must stay >= 0)")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(self.stream_scale > 0, "stream_scale", "must be > 0")
        need(self.sir_weight >= 0, "sir_weight", "must be >= 0")
        need(self.air_weight >= 0, "air_weight", "must be >= 0")
        need(self.ir_kl_form in KL_FORMS, "ir_kl_form", f"{self.ir_kl_form!r} is not one of {list(KL_FORMS)}")
        need(len(self.post_ks) > 0 and all(k >= 2 for k in self.post_ks), "post_ks",
             "must list at least one K >= 2 (the authors': [10])")
        need(len(set(self.post_ks)) == len(self.post_ks), "post_ks", "lists a K twice")


@register("dynacl", settings=DynACLSettings)
class DynACL(Method):
    branches = ("normal", "pgd")

    @property
    def uses_ir(self) -> bool:
        return self.settings.sir_weight > 0 or self.settings.air_weight > 0

    @classmethod
    def post_process(cls, cfg) -> PostProcess | None:
        return PostProcess(method="lpaff", ks=tuple(cfg.dynacl.post_ks)) if cfg.dynacl.post else None

    def schedule(self, epoch: int) -> tuple[float, float]:
        """(μ, w) at the 0-based `epoch`."""
        s = self.settings
        strength = augmentation_strength(epoch, self.cfg.train.epochs, s.period)
        return strength, adversarial_weight(strength, s.weight_rate)

    def attack(self, module, t1: torch.Tensor, t2: torch.Tensor, generator, share: float = 1.0) -> PGDResult:
        """[t1+δ1; t2+δ2] maximising ℓ(f_a(t1+δ1), f_a(t2+δ2)) jointly, the network in eval mode (BN running
        statistics, nothing updated: PGD_contrastive's `model.eval()`), then back in its mode."""
        a, b, t = self.cfg.attack, t1.shape[0], self.settings.temperature

        def objective(x):
            z = module(x, (("pgd", 2 * b),))["proj"]
            return multiview_nt_xent(torch.stack([z[:b], z[b:]], dim=1), t, gather=True)

        was_training = module.training
        module.eval()
        try:
            return pgd(objective, torch.cat([t1, t2]), a.eps * share, a.step_size * share, a.steps, a.random_start,
                       generator)
        finally:
            module.train(was_training)

    def training_step(self, ctx: StepContext) -> StepOutput:
        s, v, b = self.settings, self.cfg.views, ctx.images.shape[0]
        strength, weight = self.schedule(ctx.epoch)
        t1, t2 = batch_views(ctx.images, ctx.random, crop=False, simclr=2, **strength_view_settings(strength, v))
        share = ramp(ctx.step, ctx.steps_per_epoch, self.cfg.attack.eps_ramp_epochs)
        adv = self.attack(ctx.module, t1, t2, ctx.random, share)
        # ONE forward; each pair is one BN batch (the authors forward both views of a pair together), the
        # un-augmented image its own (the AIR code's separate `model(ori_inputs, 'normal')`).
        inputs, plan = [t1, t2, adv.x_adv], [("normal", 2 * b), ("pgd", 2 * b)]
        if self.uses_ir:
            inputs.append(original_image(ctx.images, v.size))
            plan.append(("normal", b))
        z = ctx.model(torch.cat(inputs), tuple(plan))["proj"]
        nat1, nat2, adv1, adv2 = z[:b], z[b:2 * b], z[2 * b:3 * b], z[3 * b:4 * b]
        loss, parts = dynacl_loss(nat1, nat2, adv1, adv2, weight, s.temperature, s.stream_scale, s.sir_weight,
                                  s.air_weight, orig=z[4 * b:] if self.uses_ir else None, kl_form=s.ir_kl_form)
        metrics = {name: value.detach() for name, value in parts.items()}
        metrics["loss"] = loss.detach()
        metrics["attack_gain"] = adv.last_loss - adv.initial_loss  # NT-Xent gained before the last PGD step
        metrics["strength"] = metrics["loss"].new_full((), strength)  # a fill kernel: no host-to-device copy
        metrics["adv_weight"] = metrics["loss"].new_full((), weight)
        return StepOutput(loss, metrics)

    def describe(self) -> str:
        s = self.settings
        extra = f", SIR {s.sir_weight}, AIR {s.air_weight}" if self.uses_ir else ""
        last = augmentation_strength(self.cfg.train.epochs - 1, self.cfg.train.epochs, s.period)
        return (f"dynacl (strength 1 → {last:.3g} every {s.period} epochs, λ {s.weight_rate:.3g}{extra}"
                + (", then lpaff" if s.post else "") + ")")


# DynACL++: the same pretraining, then pseudo-labels from its own features and LP-AFF (methods/lpaff.py).
register_variant("dynacl++", "dynacl", **{"dynacl.post": True})
# DynACL-AIR(++): the AIR repo's pretraining.py --ACL_DS --DynAug with run.sh's λ1 = λ2 = 0.5 and AIR.py's
# un-halved streams (c = 1); "++" adds the same post-processing (run.sh: LP-AFF.py from its checkpoint).
AIR_OPTIONS = {"dynacl.stream_scale": 1.0, "dynacl.sir_weight": 0.5, "dynacl.air_weight": 0.5}
register_variant("dynacl_air", "dynacl", **AIR_OPTIONS)
register_variant("dynacl_air++", "dynacl", **AIR_OPTIONS, **{"dynacl.post": True})

__all__ = ["DynACL", "DynACLSettings", "adversarial_weight", "augmentation_strength", "dynacl_loss",
           "original_image", "strength_view_settings"]
