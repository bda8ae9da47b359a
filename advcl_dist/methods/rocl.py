"""RoCL (Kim, Tack & Hwang, NeurIPS 2020): instance-wise attacks, the adversarial view as an extra positive.

What the authors' code computes (Kim-Minseon/RoCL: src/rocl_train.py, src/attack_lib.py RepresentationAdv,
src/loss.py; run with the README's flags `--advtrain_type=Rep --loss_type=sim --attack_to=other
--regularize_to=other --k=7`), per batch:

- two SimCLR views t1(x), t2(x);
- the instance-wise attack: δ starts at t1 (uniform random start) and ascends the two-view NT-Xent of
  (t1 + δ, t2) — t2 the positive, every other embedding of the batch a negative — with the network's
  BatchNorm in eval mode (running statistics);
- the loss  L = NT-Xent(t1, t2, t1 + δ) + λ · NT-Xent(t1 + δ, t2),  λ = 1/256: the adversarial view is a
  third positive of the other two, plus the regulariser that pulls t1 + δ to t2;
- one BatchNorm, no branches: the regulariser's forward normalises [t1 + δ; t2] with their joint batch
  statistics and the main forward [t1; t2; t1 + δ] with theirs (the authors' two train-mode forwards; here
  one forward of two BN segments, which gives the same outputs, gradients and running statistics);
- the projection head Linear(512, 2048) → ReLU → Linear(2048, 128) without BatchNorm (src/models/projector.py).

NT-Xent as in src/loss.py NT_xent: every embedding is an anchor; its loss is the SUM over its positives of
−log softmax of the cosine similarities / τ over all other embeddings, averaged over anchors (for two views
SimCLR's loss; for three, 2× the mean-over-positives form of losses.multiview_nt_xent). The authors'
similarity matrix detaches its key side (pairwise_similarity: `mm(z, z.T.detach())`): gradients reach an
embedding only as an anchor (`rocl.detach_keys`, default on). Their negatives are the global batch in the main
term and the GPU's own batch in the attack and the regulariser; here all three use the global batch, so that
the loss does not depend on the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGDResult, pgd, ramp
from ..distributed import gather_rows
from ..models import AdvCLNet, build_model, views_plan
from .base import Method, StepContext, StepOutput, bn_mode, register, split_views
from .simclr import simclr_views


def rocl_nt_xent(z: torch.Tensor, temperature: float, detach_keys: bool = True) -> torch.Tensor:
    """The authors' NT-Xent of `z` [B, V, D] over the global batch (module docstring).

    Mean over the B·V local anchors of Σ_{positives} −log(exp(s⁺/τ) / Σ_{k ≠ anchor} exp(s_k/τ)), s the cosine
    similarity, the positives the other V−1 views of the anchor's sample, the contrast set every embedding of
    every rank. With `detach_keys` the contrast side carries no gradient (src/loss.py pairwise_similarity).
    """
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"z must be [B, V>=2, D], got {tuple(z.shape)}")
    with torch.autocast(z.device.type, enabled=False):
        b, v, _ = z.shape
        anchors = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1).reshape(b * v, -1)
        contrast, offset = gather_rows(anchors.detach() if detach_keys else anchors)
        logits = anchors @ contrast.T / temperature
        rows = torch.arange(b * v, device=z.device) + offset
        cols = torch.arange(contrast.shape[0], device=z.device)
        self_mask = cols[None, :] == rows[:, None]
        log_prob = torch.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=1)
        positives = (cols[None, :] // v == rows[:, None] // v) & ~self_mask
        return -log_prob.masked_fill(~positives, 0.0).sum(1).mean()


class PlainProjection(nn.Module):
    """RoCL's projection head: Linear → ReLU → Linear, no BatchNorm (src/models/projector.py); L2-normalised
    output, as the `proj` of every head here. The BN plan is accepted and ignored."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, h: torch.Tensor, plan=None) -> torch.Tensor:
        return F.normalize(self.fc2(torch.relu(self.fc1(h))), dim=1)


@dataclass
class RoCLSettings:
    """The `rocl` config section (defaults: the authors' CIFAR-10 code, Kim-Minseon/RoCL)."""

    # λ of the regulariser NT-Xent(t1 + δ, t2): src/argument.py `--lamda 256`, applied as 1/lamda in
    # src/attack_lib.py RepresentationAdv.get_loss
    reg_weight: float = 1 / 256
    # no gradient through the key side of the similarity matrix (src/loss.py pairwise_similarity)
    detach_keys: bool = True

    def check(self, need) -> None:
        need(self.reg_weight >= 0, "reg_weight", "must be >= 0")


@register("rocl", settings=RoCLSettings)
class RoCL(Method):
    """One BN branch; the encoder, the plain projection head and every step's loss as in the module docstring."""

    branches = ("normal",)

    def build_model(self) -> AdvCLNet:
        m = self.cfg.model
        net = build_model(m.arch, m.width, self.branches, projector=False, init=m.init)
        net.projector = PlainProjection(net.feat_dim, m.proj_hidden or net.feat_dim, m.proj_dim)
        return net

    def nt_xent(self, z: torch.Tensor) -> torch.Tensor:
        return rocl_nt_xent(z, self.cfg.loss.temperature, self.settings.detach_keys)

    def attack(self, module: nn.Module, t1: torch.Tensor, t2: torch.Tensor, generator, share: float = 1.0
               ) -> PGDResult:
        """t1 + δ maximising NT-Xent(t1 + δ, t2), BatchNorm in eval mode (src/attack_lib.py: model.eval()).

        In eval mode t2's projection does not depend on the batch it is forwarded with, so it is computed
        once instead of at every step as the authors do; the result is the same.
        """
        a, plan = self.cfg.attack, views_plan(("normal",), t1.shape[0])
        with bn_mode(module):
            with torch.no_grad():
                z_t2 = module(t2, plan)["proj"]

            def objective(x_adv: torch.Tensor) -> torch.Tensor:
                return self.nt_xent(torch.stack([module(x_adv, plan)["proj"], z_t2], dim=1))

            return pgd(objective, t1, a.eps * share, a.step_size * share, a.steps, a.random_start, generator)

    def training_step(self, ctx: StepContext) -> StepOutput:
        b = ctx.images.shape[0]
        t1, t2 = simclr_views(ctx.images, ctx.random, self.cfg.views)
        share = ramp(ctx.step, ctx.steps_per_epoch, self.cfg.attack.eps_ramp_epochs)
        adv = self.attack(ctx.module, t1, t2, ctx.random, share)
        # Regulariser segment [t1 + δ; t2] first (the authors forward it first), then [t1; t2; t1 + δ].
        views = torch.cat([adv.x_adv, t2, t1, t2, adv.x_adv])
        z = ctx.model(views, (("normal", 2 * b), ("normal", 3 * b)))["proj"]
        loss_reg = self.nt_xent(split_views(z[: 2 * b], 2))
        loss_con = self.nt_xent(split_views(z[2 * b:], 3))
        loss = loss_con + self.settings.reg_weight * loss_reg
        metrics = {"loss": loss.detach(), "loss_con": loss_con.detach(), "loss_reg": loss_reg.detach(),
                   "attack_gain": adv.last_loss - adv.initial_loss}
        return StepOutput(loss, metrics)
