"""AdvCL (Fan et al., NeurIPS 2021): robustness-aware views + pseudo-label supervision.

Per batch: the lightly augmented x, two SimCLR views t1/t2 and the high-frequency view
x_h of x; δ maximises the four-view contrastive loss of (x+δ, t1, t2, x_h) through the
`pgd` BN branch; with pseudo-labels, δ_ce maximises their mean CE through `pgd_ce` (both
attacks share each PGD step's forward). The training forward runs all views in one pass:
L = L_con + λ · mean_K CE_K(x + δ_ce).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function

from ..attacks import PGDResult, pgd, ramp
from ..config import ConfigError
from ..data.augment import batch_views
from ..engine.objective import DataFacts
from ..losses import pseudo_label_ce
from ..models import views_plan
from ..views import high_frequency
from .base import Method, StepContext, StepOutput, register, split_views
from .simclr import view_settings


def advcl_views(images: torch.Tensor, generator, views_cfg, hf_radius: float) -> tuple[torch.Tensor, ...]:
    """All views of an AdvCL batch, (x, t1, t2, x_h): the crop + flip view x, two SimCLR views and the high
    frequencies of x. The same as crop_flip_view, simclr_views and high_frequency one after the other (the
    authors' order, which bench/reference.py keeps), in a number of kernels that does not grow with the batch."""
    x, t1, t2 = batch_views(images, generator, crop=True, simclr=2, **view_settings(views_cfg))
    return x, t1, t2, high_frequency(x, hf_radius)


@dataclass
class AdvCLSettings:
    """The `advcl` config section: AdvCL's own settings (defaults: the authors' CIFAR-10 code)."""

    pseudo_weight: float = 0.2  # λ of the pseudo-label CE term, eq. (10)
    hf_radius: float = 8.0  # radius of the low-frequency disk removed to make x_h, eq. (8)
    # δ and δ_ce share each PGD step's forward ([x+δ; x+δ_ce], per-branch BN statistics): the same
    # perturbations with half the passes (launches, host time), at the cost of a copy per BN layer.
    fuse_attacks: bool = True

    def check(self, need) -> None:
        need(self.pseudo_weight >= 0, "pseudo_weight", "must be >= 0")
        need(self.hf_radius >= 0, "hf_radius", "must be >= 0")


def load_pseudo_labels(path: str | Path, num_samples: int, ks) -> np.ndarray:
    """Read pseudo_labels.npy and check it lines up with the dataset and the heads."""
    try:
        labels = np.load(path, allow_pickle=False)  # a pickled object array could run code: refused
    except (OSError, ValueError) as e:
        raise ConfigError(f"pseudo.labels {path} is not a readable .npy array of integers ({e}); write it with "
                          "the clustering stage (tools/cluster.py) or np.save") from None
    redo = ("; cluster this dataset again with the same pseudo.ks (tools/cluster.py writes pseudo_labels.npy), "
            "or point pseudo.labels at the file made for it")
    if labels.ndim != 2 or labels.shape != (num_samples, len(ks)):
        raise ConfigError(f"pseudo.labels {path}: shape {labels.shape}, expected ({num_samples}, {len(ks)}) — "
                          f"one row per dataset index and one column per K in pseudo.ks={list(ks)}{redo}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"pseudo.labels {path}: dtype {labels.dtype}, expected integers (cluster ids){redo}")
    for col, k in enumerate(ks):
        bad = (labels[:, col] < -1) | (labels[:, col] >= k)
        if bad.any():
            raise ConfigError(f"pseudo.labels {path}: column {col} (K={k}) has labels outside [-1, {k - 1}] — "
                              f"it was clustered with other Ks than pseudo.ks={list(ks)}{redo}")
    return labels


@register("advcl", settings=AdvCLSettings)
class AdvCL(Method):
    """Needs pseudo-labels (the pipeline clusters f_pre features first); without them (pseudo.labels=null
    when run alone) it trains on the contrastive term only."""

    branches = ("normal", "pgd", "pgd_ce")
    needs = frozenset({"pseudo_labels"})
    pseudo_labels: torch.Tensor | None = None  # [num_samples, len(ks)] on the device, after `bind`

    def bind(self, facts: DataFacts, device) -> None:
        super().bind(facts, device)
        cfg = self.cfg
        self.pseudo_labels = None
        if cfg.pseudo.labels is not None:
            labels = load_pseudo_labels(cfg.pseudo.labels, facts.num_samples, cfg.pseudo.ks)
            self.pseudo_labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        else:
            # Without pseudo-labels there is no δ_ce: a `pgd_ce` BN branch would hold parameters that
            # never get a gradient (which DDP rejects) and that no later stage uses.
            self.branches = ("normal", "pgd")

    def pseudo_ks(self):
        return tuple(self.cfg.pseudo.ks) if self.pseudo_labels is not None else ()

    def attacks(self, model, x, clean_views, pseudo, generator, share: float = 1.0) -> PGDResult:
        """δ on the four-view contrastive loss of (x+δ, t1, t2, x_h) through the `pgd` branch and, with
        pseudo-labels, δ_ce on their mean CE through `pgd_ce`: x_adv = [x+δ] or [x+δ; x+δ_ce], with one
        initial loss per attack; ε and the step size times `share` (attacks.ramp).

        The clean views' projections are computed once, not at every PGD step. The two attacks are
        independent (same x, ε, steps; separate BN branches and losses), so with advcl.fuse_attacks each PGD step
        forwards [x+δ; x+δ_ce] as one batch with per-branch BN statistics: one pass per step instead of
        two, with the same δ and δ_ce as two separate attacks (tests/test_methods.py checks both ways).
        """
        b, a = x.shape[0], self.cfg.attack
        with torch.no_grad():
            z_clean = split_views(model(clean_views, views_plan(("normal",) * 3, b))["proj"], 3)

        def contrastive(out, rows=slice(None)):
            return self.contrastive(torch.cat([out["proj"][rows, None], z_clean], dim=1))

        def pseudo_ce(out, rows=slice(None)):
            return pseudo_label_ce([logits[rows] for logits in out["pseudo_logits"]], pseudo)

        def attack(objective, start, segments=1):
            return pgd(objective, start, a.eps * share, a.step_size * share, a.steps, a.random_start, generator,
                       segments)

        if pseudo is None:
            return attack(lambda x_adv: contrastive(model(x_adv, (("pgd", b),))), x)
        if self.settings.fuse_attacks:
            plan = views_plan(("pgd", "pgd_ce"), b)

            def both(x_adv):
                out = model(x_adv, plan)
                return torch.stack([contrastive(out, slice(0, b)), pseudo_ce(out, slice(b, None))])

            return attack(both, torch.cat([x, x]), segments=2)
        con = attack(lambda x_adv: contrastive(model(x_adv, (("pgd", b),))), x)
        ce = attack(lambda x_adv: pseudo_ce(model(x_adv, (("pgd_ce", b),))), x)
        return PGDResult(torch.cat([con.x_adv, ce.x_adv]), torch.stack([con.initial_loss, ce.initial_loss]),
                         torch.stack([con.last_loss, ce.last_loss]))

    def training_step(self, ctx: StepContext) -> StepOutput:
        # `ctx.labels` (true classes) are ignored: AdvCL is self-supervised.
        model, images, generator = ctx.model, ctx.images, ctx.random
        v, b = self.cfg.views, images.shape[0]
        with record_function("advcl/views"):
            x, t1, t2, x_h = advcl_views(images, generator, v, self.settings.hf_radius)
        pseudo = self.pseudo_labels[ctx.indices] if self.pseudo_labels is not None else None
        with record_function("advcl/attacks"):
            share = ramp(ctx.step, ctx.steps_per_epoch, self.cfg.attack.eps_ramp_epochs)
            adv = self.attacks(ctx.module, x, torch.cat([t1, t2, x_h]), pseudo, generator, share)
        # Training views: x + δ (pgd), t1, t2, x_h (normal) [, x + δ_ce (pgd_ce)].
        views = [adv.x_adv[:b], t1, t2, x_h] + ([] if pseudo is None else [adv.x_adv[b:]])
        branches = ["pgd", "normal", "normal", "normal"] + ([] if pseudo is None else ["pgd_ce"])
        with record_function("advcl/training_forward"):
            out = model(torch.cat(views), views_plan(branches, b))
            loss_con = self.contrastive(split_views(out["proj"][: 4 * b], 4))
            initial_con = adv.initial_loss if pseudo is None else adv.initial_loss[0]
            metrics = {"loss_con": loss_con.detach(), "attack_gain": loss_con.detach() - initial_con}
            loss = loss_con
            if pseudo is not None:
                loss_ce = pseudo_label_ce([logits[4 * b:] for logits in out["pseudo_logits"]], pseudo)
                loss = loss_con + self.settings.pseudo_weight * loss_ce
                metrics["loss_ce"] = loss_ce.detach()
        metrics["loss"] = loss.detach()
        return StepOutput(loss, metrics)
