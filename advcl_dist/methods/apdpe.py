"""AP-DPE (Chen, Liu, Chang, Cheng, Amini, Wang, CVPR 2020): adversarial pretraining on pretext tasks.

The "AP-DPE" baseline of the AdvCL tables: adversarial training of self-supervised pretext classifiers —
rotation (4 classes) and jigsaw (P + 1 classes) — and their ensemble with the diversity penalty of the
authors' ensemble_pretrain.py (TAMU-VITA, now VITA-Group/Adv-SS-Pretraining). Per batch, for each task t
with view v_t = T_t(x) of the crop + flip image x and its label y_t, and ℓ_t(u) = CE(head_t(f(u)), y_t):

- single task (train_adv_rotation.py / train_adv_jigsaw.py): δ_t maximises ℓ_t(v_t + δ_t) by PGD, and
  L = (ℓ_t(v_t) + ℓ_t(v_t + δ_t)) / 2;
- ensemble (ensemble_pretrain.py, attack_algo_ensemble.py): with g_t = ∇_{u_t} ℓ_t(u_t) at u_t = v_t + δ_t,
  normalised per image, and h = mean_i log det(Ĝ_iᵀ Ĝ_i + 10⁻⁵ I), Ĝ_i = [ĝ_1i … ĝ_Ti],
  the perturbations jointly ascend J = Σ_t ℓ_t(v_t + δ_t) + λ·h (each δ_t along ∂J/∂u_t, double backward
  through h), and L = (Σ_t ℓ_t(v_t) + Σ_t ℓ_t(v_t + δ_t)) / (2T) + λ·h, λ = 0.1 in both.

Differences from the authors' code, kept deliberately: a ResNet-18 encoder (AdvCL's backbone for every
row of its tables) shared by all tasks with one linear head each (theirs: a ResNet-50v2 trunk with one
layer4 per task and ImageNet input normalisation); Selfie, their third ensemble task, is not implemented
(its transformer head is not part of this package), so the ensemble is rotation + jigsaw; the jigsaw
permutations are drawn from `apdpe.permutation_seed` (theirs: unseeded, unpublished); the last epoch is
kept (they select on a validation split); plain SGD momentum (their ensemble run uses Nesterov).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attacks import PGDResult, pgd, ramp
from ..config import ConfigError
from ..data.augment import crop_flip_view
from ..engine.objective import LoopSettings
from ..models import AdvCLNet, build_model, views_plan
from .base import Method, StepContext, StepOutput, register, register_variant
from .pretext import ROTATIONS, jigsaw, jigsaw_labels, jigsaw_permutations, rotate, rotation_labels

TASKS = ("rotation", "jigsaw")
LOGDET_JITTER = 1e-5  # the authors' 1e-5·I added to ĜᵀĜ (calculate_log_det)
NORM_FLOOR = 1e-10  # the authors' ‖g‖ + 1e-10


@dataclass
class APDPESettings:
    """The `apdpe` config section (defaults: the authors' CIFAR-10 code, VITA-Group/Adv-SS-Pretraining)."""

    # Pretext tasks, each with its own linear head. The default is the ensemble: the AdvCL paper's "AP-DPE" row
    # is Chen et al.'s ensemble pretraining with the diversity penalty (README "Ensemble pretrain with penalty",
    # ensemble_pretrain.py), minus Selfie (not implemented here). Variants apdpe_rotation / apdpe_jigsaw: one each.
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    # λ of the log-det penalty h, in the attack and in the loss (attack_algo_ensemble.py `lambda_h=0.1`,
    # ensemble_pretrain.py `0.1*h_loss`); only with two or more tasks.
    diversity_weight: float = 0.1
    # Patches per side: the authors cut 32×32 images into 8×8-pixel patches (split_image N=8): 4 × 4.
    jigsaw_grid: int = 4
    # Permutations besides the identity: train_adv_jigsaw.py `--class_number 31` (30 + the unshuffled class 0).
    jigsaw_permutations: int = 30
    # Probability of forcing the unshuffled class 0 (the authors' `bias = 0.9`: order = 0 when rand > 0.9).
    jigsaw_identity_p: float = 0.1
    # Seed of the fixed permutation set (the authors' set is an unseeded random draw; see pretext.py).
    permutation_seed: int = 0

    def check(self, need) -> None:
        tasks = list(self.tasks)
        need(len(tasks) > 0, "tasks", f"must list at least one pretext task of {list(TASKS)}")
        unknown = [t for t in tasks if t not in TASKS]
        need(not unknown, "tasks", f"{unknown} unknown; choose from {list(TASKS)}")
        need(len(set(tasks)) == len(tasks), "tasks", "lists a task twice")
        need(self.diversity_weight >= 0, "diversity_weight", "must be >= 0 (0: no diversity penalty)")
        need(self.jigsaw_grid >= 2, "jigsaw_grid", "must be >= 2 patches per side")
        most = math.factorial(self.jigsaw_grid**2) - 1 if self.jigsaw_grid >= 2 else 0
        need(self.jigsaw_grid < 2 or 1 <= self.jigsaw_permutations <= most, "jigsaw_permutations",
             f"must be in [1, {most}] (the non-identity permutations of a {self.jigsaw_grid}×{self.jigsaw_grid} grid)")
        need(0 <= self.jigsaw_identity_p <= 1, "jigsaw_identity_p", "is a probability: must be in [0, 1]")
        need(self.permutation_seed >= 0, "permutation_seed", "must be >= 0")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gradient_logdet(grads: Sequence[torch.Tensor], jitter: float = LOGDET_JITTER) -> torch.Tensor:
    """h = mean_i log det(Ĝ_iᵀ Ĝ_i + jitter·I): Ĝ_i's columns are image i's input gradients of the T tasks,
    each flattened and divided by (‖·‖₂ + 1e-10) (the authors' calculate_log_det). Differentiable (double
    backward when the gradients were taken with create_graph)."""
    with torch.autocast(grads[0].device.type, enabled=False):
        g = torch.stack([_at_least_fp32(t).flatten(1) for t in grads], dim=2)  # [B, D, T]
        g = g / (g.norm(dim=1, keepdim=True) + NORM_FLOOR)
        eye = torch.eye(len(grads), dtype=g.dtype, device=g.device)
        return torch.logdet(g.transpose(1, 2) @ g + jitter * eye).mean()


def pretext_loss(clean: Sequence[torch.Tensor], adversarial: Sequence[torch.Tensor],
                 adversarial_grads: Sequence[torch.Tensor] | None = None,
                 diversity_weight: float = 0.1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L, h): L = (Σ_t ℓ_t(v_t) + Σ_t ℓ_t(v_t + δ_t)) / (2T) [+ λ·h(adversarial_grads) for T ≥ 2 and λ > 0]."""
    terms = [*clean, *adversarial]
    loss = sum(terms) / len(terms)
    if len(adversarial) < 2 or diversity_weight == 0:
        return loss, None
    h = gradient_logdet(adversarial_grads)
    return loss + diversity_weight * h, h


@dataclass(frozen=True)
class PretextBatch:
    views: torch.Tensor  # [T·B, C, S, S]: task t's views are rows t·B .. (t+1)·B
    labels: list[torch.Tensor]  # one int64 [B] per task


@register("apdpe", settings=APDPESettings)
class APDPE(Method):
    branches = ("normal",)  # one BN: the authors forward clean and adversarial views separately through plain BN

    def __init__(self, cfg):
        super().__init__(cfg)
        s = self.settings
        self.tasks = tuple(s.tasks)
        self.permutations = None
        if cfg.train.sync_bn and len(self.tasks) > 1 and s.diversity_weight > 0:
            # h differentiates input gradients (double backward); neither torch's SyncBatchNorm nor the CPU
            # GlobalBatchNorm's gather has a differentiable backward, so the penalty's gradients would be wrong.
            raise ConfigError("config key 'train.sync_bn': AP-DPE's diversity penalty needs a double backward, which "
                              "cross-rank BN statistics do not have; set train.sync_bn=false (the authors' per-rank "
                              "BN) or apdpe.diversity_weight=0")
        if "jigsaw" in self.tasks:
            if cfg.views.size % s.jigsaw_grid:
                raise ConfigError(f"config key 'apdpe.jigsaw_grid': views.size={cfg.views.size} does not cut into "
                                  f"{s.jigsaw_grid}×{s.jigsaw_grid} equal patches; pick a grid that divides it")
            self.permutations = jigsaw_permutations(s.jigsaw_permutations, s.jigsaw_grid, s.permutation_seed)

    def loop_settings(self) -> LoopSettings:
        """The schema's optimiser section (the presets hold the authors' values); the task list and the
        permutation set define what the heads mean, so a resume must not change them."""
        base = super().loop_settings()
        keys = ("apdpe.tasks", "apdpe.jigsaw_grid", "apdpe.jigsaw_permutations", "apdpe.permutation_seed")
        return dataclasses.replace(base, identity=base.identity + keys)

    def head_sizes(self) -> tuple[int, ...]:
        return tuple(ROTATIONS if t == "rotation" else len(self.permutations) for t in self.tasks)

    def pseudo_ks(self) -> tuple[int, ...]:
        return self.head_sizes()

    def build_model(self) -> AdvCLNet:
        m = self.cfg.model
        return build_model(m.arch, m.width, self.branches, pseudo_ks=self.head_sizes(), projector=False, init=m.init)

    def pretext_batch(self, images: torch.Tensor, random) -> PretextBatch:
        """x = crop + flip of the batch (the authors' RandomCrop(32, 4) + flip), then each task's view and labels
        (draws in this order: the crop, then each task's labels in `apdpe.tasks` order)."""
        v, s, b = self.cfg.views, self.settings, images.shape[0]
        x = crop_flip_view(images, random, size=v.size, padding=v.padding)
        views, labels = [], []
        for task in self.tasks:
            if task == "rotation":
                y = rotation_labels(random, b)
                views.append(rotate(x, y))
            else:
                y = jigsaw_labels(random, b, len(self.permutations), s.jigsaw_identity_p)
                views.append(jigsaw(x, self.permutations, y, s.jigsaw_grid))
            labels.append(y)
        return PretextBatch(torch.cat(views), labels)

    def task_losses(self, out: dict, labels: Sequence[torch.Tensor], first_block: int = 0) -> list[torch.Tensor]:
        """ℓ_t: CE of head t on row block first_block + t (blocks of B rows)."""
        b = labels[0].shape[0]
        return [F.cross_entropy(_at_least_fp32(logits[(first_block + t) * b:(first_block + t + 1) * b]), labels[t])
                for t, logits in enumerate(out["pseudo_logits"])]

    def attack_objective(self, module, labels: Sequence[torch.Tensor]):
        """u ↦ J(u) for u = [u_1; …; u_T]: ℓ_t for one task; for several, [ℓ_t + λ·h/T]_t (their sum is J, and
        each ℓ_t depends on its own block only: per-block BN statistics), for pgd(..., segments=T)."""
        tasks, b, weight = len(self.tasks), labels[0].shape[0], self.settings.diversity_weight
        plan = views_plan(("normal",) * tasks, b)

        def objective(u: torch.Tensor) -> torch.Tensor:
            losses = self.task_losses(module(u, plan), labels)
            if tasks == 1:
                return losses[0]
            if weight == 0:
                return torch.stack(losses)
            (grads,) = torch.autograd.grad(sum(losses), u, create_graph=True)
            h = gradient_logdet(grads.chunk(tasks))
            return torch.stack([loss + weight * h / tasks for loss in losses])

        return objective

    def attack(self, module, batch: PretextBatch, random, share: float = 1.0) -> PGDResult:
        """δ = [δ_1; …; δ_T] ascending J from a uniform start in the ε-ball (ε, step size × `share`)."""
        a = self.cfg.attack
        return pgd(self.attack_objective(module, batch.labels), batch.views, a.eps * share, a.step_size * share,
                   a.steps, a.random_start, random, segments=len(self.tasks))

    def training_step(self, ctx: StepContext) -> StepOutput:
        # `ctx.labels` (true classes) are ignored: the pretext labels are the supervision.
        share = ramp(ctx.step, ctx.steps_per_epoch, self.cfg.attack.eps_ramp_epochs)
        return self.step_loss(ctx.model, ctx.module, self.pretext_batch(ctx.images, ctx.random), ctx.random, share)

    def step_loss(self, model, module, batch: PretextBatch, random, share: float = 1.0) -> StepOutput:
        """Attack `module` (the plain network), then ONE forward of [clean views; adversarial views] through
        `model` (maybe DDP) with per-view BN statistics, and L of `pretext_loss`."""
        tasks, weight, b = len(self.tasks), self.settings.diversity_weight, batch.labels[0].shape[0]
        adv = self.attack(module, batch, random, share)
        penalty = tasks > 1 and weight > 0
        x_adv = adv.x_adv.requires_grad_(penalty)  # a fresh leaf: h needs ∂ℓ_t/∂u_t
        out = model(torch.cat([batch.views, x_adv]), views_plan(("normal",) * (2 * tasks), b))
        clean = self.task_losses(out, batch.labels)
        adversarial = self.task_losses(out, batch.labels, first_block=tasks)
        grads = torch.autograd.grad(sum(adversarial), x_adv, create_graph=True)[0].chunk(tasks) if penalty else None
        loss, h = pretext_loss(clean, adversarial, grads, weight)
        metrics = {"loss": loss.detach(), "loss_clean": (sum(clean) / tasks).detach(),
                   "loss_adv": (sum(adversarial) / tasks).detach(),
                   "attack_gain": (adv.last_loss - adv.initial_loss).sum()}  # J at the last PGD step − at the start
        if h is not None:
            metrics["diversity"] = h.detach()
        for t, (task, logits) in enumerate(zip(self.tasks, out["pseudo_logits"])):
            hits = logits[(tasks + t) * b:(tasks + t + 1) * b].detach().argmax(1) == batch.labels[t]
            metrics[f"{task}_adv_accuracy"] = hits.float().mean() * 100
        return StepOutput(loss, metrics)


register_variant("apdpe_rotation", "apdpe", **{"apdpe.tasks": ["rotation"]})
register_variant("apdpe_jigsaw", "apdpe", **{"apdpe.tasks": ["jigsaw"]})
