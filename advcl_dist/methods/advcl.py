"""AdvCL (Fan et al., NeurIPS 2021): robustness-aware views + pseudo-label supervision.

Per batch: the lightly augmented x, two SimCLR views t1/t2 and the high-frequency view
x_h of x; δ maximises the four-view contrastive loss of (x+δ, t1, t2, x_h) through the
`pgd` BN branch; with pseudo-labels, δ_ce maximises their mean CE through `pgd_ce` (both
attacks share each PGD step's forward). The training forward runs all views in one pass:
L = L_con + λ · mean_K CE_K(x + δ_ce).

The contrastive view set is configurable (`advcl.views`, methods/advcl_views.py) for the paper's
view-selection ablation: every `_adv` view gets its own δ, all found jointly on the set's contrastive
loss; each set is also a registered variant (`advcl_t1adv_t2`, ...) that pipeline.baselines accepts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function

from ..attacks import PGDResult, pgd, ramp
from ..config import ConfigError
from ..engine.objective import DataFacts
from ..losses import pseudo_label_ce
from ..models import views_plan
from .advcl_views import ADVCL_VIEW_SET, TABLE4_VIEW_SETS, make_views, parse_view_set, variant_name, view_set_problem
from .base import Method, StepContext, StepOutput, register, register_variant, split_views


def advcl_views(images: torch.Tensor, generator, views_cfg, hf_radius: float) -> tuple[torch.Tensor, ...]:
    """All views of an AdvCL batch, (x, t1, t2, x_h): the crop + flip view x, two SimCLR views and the high
    frequencies of x. The same as crop_flip_view, simclr_views and high_frequency one after the other (the
    authors' order, which bench/reference.py keeps), in a number of kernels that does not grow with the batch."""
    views = make_views(images, generator, views_cfg, hf_radius, ADVCL_VIEW_SET)
    return views["x"], views["t1"], views["t2"], views["x_h"]


@dataclass
class AdvCLSettings:
    """The `advcl` config section: AdvCL's own settings (defaults: the authors' CIFAR-10 code)."""

    pseudo_weight: float = 0.2  # λ of the pseudo-label CE term, eq. (10)
    hf_radius: float = 8.0  # radius r of the low-frequency disk: removed for x_h (eq. 8), kept for x_l
    # δ and δ_ce share each PGD step's forward ([x+δ; x+δ_ce], per-branch BN statistics): the same
    # perturbations with half the passes (launches, host time), at the cost of a copy per BN layer.
    fuse_attacks: bool = True
    # The contrastive view set, eq. (9) (pretraining_advCL.py: x+δ, t1, t2, x_h); tokens and the ablation's
    # sets in methods/advcl_views.py.
    views: list[str] = field(default_factory=lambda: list(ADVCL_VIEW_SET))

    def check(self, need) -> None:
        need(self.pseudo_weight >= 0, "pseudo_weight", "must be >= 0")
        need(self.hf_radius >= 0, "hf_radius", "must be >= 0")
        problem = view_set_problem(self.views)
        need(problem is None, "views", problem)


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


def _first(loss: torch.Tensor) -> torch.Tensor:
    """The contrastive attack's loss from pgd's per-block losses (a scalar when there was one block)."""
    return loss if loss.dim() == 0 else loss[0]


@register("advcl", settings=AdvCLSettings)
class AdvCL(Method):
    """Needs pseudo-labels (the pipeline clusters f_pre features first); without them (pseudo.labels=null
    when run alone) or with advcl.pseudo_weight=0 it trains on the contrastive term only."""

    branches = ("normal", "pgd", "pgd_ce")
    needs = frozenset({"pseudo_labels"})
    pseudo_labels: torch.Tensor | None = None  # [num_samples, len(ks)] on the device, after `bind`

    def __init__(self, cfg):
        super().__init__(cfg)
        self.view_set = parse_view_set(self.settings.views)

    def bind(self, facts: DataFacts, device) -> None:
        super().bind(facts, device)
        cfg = self.cfg
        self.pseudo_labels = None
        if cfg.pseudo.labels is not None:
            labels = load_pseudo_labels(cfg.pseudo.labels, facts.num_samples, cfg.pseudo.ks)
            # λ = 0 (the ablation without the pseudo-label term): the file is still checked, but no δ_ce and no
            # heads, whose zero-weighted CE would leave the encoder's training unchanged at a third more passes.
            if self.settings.pseudo_weight > 0:
                self.pseudo_labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        # A branch that sees no view would hold parameters that never get a gradient (which DDP rejects) and
        # that no later stage uses: `normal` only with clean views, `pgd_ce` only with pseudo-labels (δ_ce).
        used = {"normal": any(not v.adversarial for v in self.view_set), "pgd": True,
                "pgd_ce": self.pseudo_labels is not None}
        self.branches = tuple(name for name, needed in used.items() if needed)

    def pseudo_ks(self):
        return tuple(self.cfg.pseudo.ks) if self.pseudo_labels is not None else ()

    def attacks(self, model, x, clean_views, pseudo, generator, share: float = 1.0,
                adv_views: torch.Tensor | None = None) -> PGDResult:
        """δ on the contrastive loss of the view set (`advcl.views`) through the `pgd` branch and, with
        pseudo-labels, δ_ce on their mean CE through `pgd_ce`: x_adv = [adversarial views] or
        [adversarial views; x+δ_ce], with one initial loss per attack; ε and the step size times `share`
        (attacks.ramp).

        `clean_views` [C·B] are the set's clean views and `adv_views` [A·B] the inputs of its adversarial
        ones, each concatenated in the set's order (`adv_views` None: x, AdvCL's x+δ). All A perturbations
        ascend the one loss of the whole set jointly (as ACL's A2A does for t1+δ1, t2+δ2): one PGD block of
        B rows per view, the joint loss counted once. The clean views' projections are computed once, not at
        every PGD step. The contrastive and CE attacks are independent (separate BN branches and losses), so
        with advcl.fuse_attacks each PGD step forwards [adversarial views; x+δ_ce] as one batch with per-view
        BN statistics: one pass per step instead of two, with the same δs as two separate attacks
        (tests/test_methods.py checks both ways).
        """
        b, a, order = x.shape[0], self.cfg.attack, self.view_set
        n_adv = sum(v.adversarial for v in order)
        start = x if adv_views is None else adv_views
        if start.shape[0] != n_adv * b:
            raise ValueError(f"attacks: {start.shape[0]} rows of adversarial views for {n_adv} views of {b}")
        z_clean = []
        if len(order) > n_adv:
            with torch.no_grad():
                z_clean = model(clean_views, views_plan(("normal",) * (len(order) - n_adv), b))["proj"].split(b)

        def contrastive(out, rows=slice(None)):
            adv, clean = iter(out["proj"][rows].split(b)), iter(z_clean)
            return self.contrastive(torch.stack([next(adv) if v.adversarial else next(clean) for v in order], 1))

        def per_block(loss):
            # pgd ascends the sum of its blocks' losses: the joint loss once moves every δ along its gradient.
            return loss if n_adv == 1 else torch.cat([loss[None], loss.new_zeros(n_adv - 1)])

        def pseudo_ce(out, rows=slice(None)):
            return pseudo_label_ce([logits[rows] for logits in out["pseudo_logits"]], pseudo)

        def attack(objective, start, segments):
            return pgd(objective, start, a.eps * share, a.step_size * share, a.steps, a.random_start, generator,
                       segments)

        adv_plan = views_plan(("pgd",) * n_adv, b)
        if pseudo is None:
            con = attack(lambda x_adv: per_block(contrastive(model(x_adv, adv_plan))), start, n_adv)
            return PGDResult(con.x_adv, _first(con.initial_loss), _first(con.last_loss))
        if self.settings.fuse_attacks:
            plan = adv_plan + (("pgd_ce", b),)

            def both(x_adv):
                out = model(x_adv, plan)
                con = per_block(contrastive(out, slice(0, n_adv * b)))
                return torch.cat([con.reshape(-1), pseudo_ce(out, slice(n_adv * b, None))[None]])

            res = attack(both, torch.cat([start, x]), n_adv + 1)
            return PGDResult(res.x_adv, res.initial_loss[[0, -1]], res.last_loss[[0, -1]])
        con = attack(lambda x_adv: per_block(contrastive(model(x_adv, adv_plan))), start, n_adv)
        ce = attack(lambda x_adv: pseudo_ce(model(x_adv, (("pgd_ce", b),))), x, 1)
        return PGDResult(torch.cat([con.x_adv, ce.x_adv]), torch.stack([_first(con.initial_loss), ce.initial_loss]),
                         torch.stack([_first(con.last_loss), ce.last_loss]))

    def training_step(self, ctx: StepContext) -> StepOutput:
        # `ctx.labels` (true classes) are ignored: AdvCL is self-supervised.
        model, images, generator, order = ctx.model, ctx.images, ctx.random, self.view_set
        b, n = images.shape[0], len(order)
        with record_function("advcl/views"):
            views = make_views(images, generator, self.cfg.views, self.settings.hf_radius, self.settings.views)
        pseudo = self.pseudo_labels[ctx.indices] if self.pseudo_labels is not None else None
        adv_inputs = [views[v.base] for v in order if v.adversarial]
        clean = [views[v.base] for v in order if not v.adversarial]
        n_adv = len(adv_inputs)
        with record_function("advcl/attacks"):
            share = ramp(ctx.step, ctx.steps_per_epoch, self.cfg.attack.eps_ramp_epochs)
            adv = self.attacks(ctx.module, views["x"], torch.cat(clean) if clean else None, pseudo, generator, share,
                               adv_inputs[0] if n_adv == 1 else torch.cat(adv_inputs))
        # Training views in the set's order: adversarial ones through `pgd`, clean ones through `normal`
        # [, then x + δ_ce through `pgd_ce`].
        adv_rows = iter(adv.x_adv[: n_adv * b].split(b))
        train_views = [next(adv_rows) if v.adversarial else views[v.base] for v in order]
        branches = ["pgd" if v.adversarial else "normal" for v in order]
        if pseudo is not None:
            train_views.append(adv.x_adv[n_adv * b:])
            branches.append("pgd_ce")
        with record_function("advcl/training_forward"):
            out = model(torch.cat(train_views), views_plan(branches, b))
            loss_con = self.contrastive(split_views(out["proj"][: n * b], n))
            initial_con = adv.initial_loss if pseudo is None else adv.initial_loss[0]
            metrics = {"loss_con": loss_con.detach(), "attack_gain": loss_con.detach() - initial_con}
            loss = loss_con
            if pseudo is not None:
                loss_ce = pseudo_label_ce([logits[n * b:] for logits in out["pseudo_logits"]], pseudo)
                loss = loss_con + self.settings.pseudo_weight * loss_ce
                metrics["loss_ce"] = loss_ce.detach()
        metrics["loss"] = loss.detach()
        return StepOutput(loss, metrics)


# The view-selection ablation (methods/advcl_views.py): every set but AdvCL's own as a named variant.
for _views in TABLE4_VIEW_SETS:
    if _views != ADVCL_VIEW_SET:
        register_variant(variant_name(_views), "advcl", **{"advcl.views": list(_views)})
