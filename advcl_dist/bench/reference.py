"""The authors' AdvCL step, one forward per view: the baseline `tools/bench.py step` times ours against.

The authors' code forwards every view on its own through its BN branch, and at every PGD step of the
contrastive attack re-forwards the three clean views (t1, t2, x_h) beside x + δ although they do not
change during the attack (tests/test_methods.py::reference_contrastive_attack writes the same loop).
Ours (methods/advcl.py) projects the clean views once per step and runs the training forward of all five
views as one batch with per-view BN statistics. The views, random starts and losses are the same, so
only the cost differs: for the same weights, generator and step this returns the loss that
`AdvCL.training_step` returns (tests/test_bench.py checks it).

fp32 only: no autocast and no channels_last, as in the authors' code.
"""
from __future__ import annotations

import torch

from ..attacks import pgd
from ..data.augment import crop_flip_view
from ..losses import multiview_nt_xent, pseudo_label_ce
from ..methods.simclr import simclr_views
from ..rng import StepRandom
from ..views import high_frequency


def reference_step(model: torch.nn.Module, images: torch.Tensor, pseudo_labels: torch.Tensor, cfg,
                   generator: StepRandom) -> torch.Tensor:
    """L_con + λ · mean_K CE_K for uint8 `images` [B, C, H, W] and `pseudo_labels` [B, len(ks)].

    Draws from `generator` in the order `AdvCL.training_step` does: the views from its shared stream,
    then the random starts of δ and δ_ce from its noise stream (both through our `pgd`, which expresses
    the authors' loop: signed steps, projection onto the ε-ball, clamp to [0, 1]).
    """
    v, a, b = cfg.views, cfg.attack, images.shape[0]
    x = crop_flip_view(images, generator, size=v.size, padding=v.padding)
    t1, t2 = simclr_views(images, generator, v)
    x_h = high_frequency(x, cfg.advcl.hf_radius)
    # The authors' SupCon loss carries the factor temperature / base_temperature (Method.contrastive too).
    scale = cfg.loss.temperature / cfg.loss.base_temperature if cfg.loss.base_temperature else 1.0

    def contrastive(x_adv: torch.Tensor) -> torch.Tensor:
        z = [model(x_adv, (("pgd", b),))["proj"]] + [model(view, (("normal", b),))["proj"] for view in (t1, t2, x_h)]
        return scale * multiview_nt_xent(torch.stack(z, dim=1), cfg.loss.temperature)

    def pseudo_ce(x_adv: torch.Tensor) -> torch.Tensor:
        return pseudo_label_ce(model(x_adv, (("pgd_ce", b),))["pseudo_logits"], pseudo_labels)

    x_adv = pgd(contrastive, x, a.eps, a.step_size, a.steps, a.random_start, generator).x_adv
    x_ce = pgd(pseudo_ce, x, a.eps, a.step_size, a.steps, a.random_start, generator).x_adv
    # The training loss, again one forward per view: x + δ (pgd), t1, t2, x_h (normal), x + δ_ce (pgd_ce).
    return contrastive(x_adv) + cfg.advcl.pseudo_weight * pseudo_ce(x_ce)
