"""LP-AFF: DynACL++'s post-processing (Luo, Wang & Wang, ICLR 2023; authors' code PKU-ML/DYNACL
LPAFT_AFF.py, the dual-BN script; the AIR repo's LP-AFF.py for DynACL-AIR++ is the same procedure).

From the encoder of a pretraining checkpoint (`lpaff.init`, its BN branches kept) and pseudo-labels y of the
training images (k-means of that encoder's features, first column of pseudo.labels):

  1. linear probing, `head_epochs`: the encoder frozen in eval mode, a zero-initialised linear head trained
     on clean views, min CE(g(f(x)), y), SGD lr `head_lr`, constant;
  2. adversarial full finetuning, `epochs`: the whole network on TRADES (Zhang et al. 2019, eq. 5),
     min CE(g(f(x)), y) + β · KL(p(x) ‖ p(x')), x' = PGD-10 maximising the KL (attack.supervised_steps),
     SGD lr `lr`, × gamma at the milestone epochs of this phase.

Views are RandomCrop(padding) + flip of the stored image; every forward uses the BN branch that finetuning
serves (finetune.bn_branch, the authors' `pgd` route: `model(x, 'pgd')`, `natural_mode='pgd'`); the other
branches keep their pretrained weights. One run of head_epochs + epochs, whose checkpoint is a pretraining
checkpoint (encoder weights under `encoder.`), finetuned and evaluated like any other.

Where the authors' code differs (not copied): phase 2 there gets a fresh SGD (no momentum carried over from
the head's phase 1), here one optimiser runs through both; their TRADES attack starts at x itself (utils.py
trades_loss: `x_adv = x_natural.detach()`), ours follows attack.random_start like finetune.py's AFF; their
head has as many outputs as the dataset has classes (100 on CIFAR-100, with 10 pseudo-classes), ours K.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attacks import pgd
from ..config import ConfigError
from ..data.augment import crop_flip_view
from ..distributed import gather_rows
from ..engine.checkpoint import load_encoder
from ..engine.objective import DataFacts, LoopSettings
from ..losses import trades_kl
from ..models import AdvCLNet, BranchBatchNorm
from .advcl import load_pseudo_labels
from .base import Method, StepContext, StepOutput, register


@dataclass
class LPAFFSettings:
    """The `lpaff` config section (defaults: the authors' LPAFT_AFF.py flags)."""

    init: str | None = None  # the pretraining checkpoint.pt to start from (the pipeline sets it); required
    head_epochs: int = 10  # --epochs_head 10
    epochs: int = 25  # --epochs 25: the TRADES phase
    batch_size: int = 512  # --batch_size 512 (global; the loader drops the last partial batch, as theirs)
    head_lr: float = 0.01  # --lr_head 0.01, MultiStepLR(milestones=[]): constant
    lr: float = 0.1  # --lr 0.1
    momentum: float = 0.9  # SGD(momentum=0.9) in both phases
    weight_decay: float = 1.0e-4  # SGD(weight_decay=1e-4) in both phases
    milestones: list[int] = field(default_factory=lambda: [10, 20])  # MultiStepLR([10, 20]) of the TRADES phase
    gamma: float = 0.1
    trades_beta: float = 6.0  # utils.py trades_loss(beta=6.0)

    def check(self, need) -> None:
        need(self.head_epochs >= 0, "head_epochs", "must be >= 0")
        need(self.epochs >= 0, "epochs", "must be >= 0")
        need(self.head_epochs + self.epochs >= 1, "epochs", "head_epochs + epochs must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.head_lr > 0, "head_lr", "must be > 0")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(all(m >= 0 for m in self.milestones), "milestones", "epochs of the TRADES phase: must be >= 0")
        need(self.gamma > 0, "gamma", "must be > 0")
        need(self.trades_beta >= 0, "trades_beta", "must be >= 0")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def trades_objective(logits_clean: torch.Tensor, logits_adv: torch.Tensor, labels: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """CE(logits_clean, y) + β · KL(p_clean ‖ p_adv) (batch mean; rows labelled −1 leave the CE out)."""
    ce = F.cross_entropy(at_least_fp32(logits_clean), labels, ignore_index=-1)
    return ce + beta * trades_kl(logits_adv, logits_clean)


@register("lpaff", settings=LPAFFSettings)
class LPAFF(Method):
    needs = frozenset({"init", "pseudo_labels"})
    labels: torch.Tensor | None = None  # [num_samples] pseudo-labels on the device, after `bind`

    @property
    def branch(self) -> str:
        return self.cfg.finetune.bn_branch

    def loop_settings(self) -> LoopSettings:
        s, base = self.settings, super().loop_settings()
        identity = tuple(k for k in base.identity if k != "train.batch_size") + (
            "lpaff.init", "lpaff.batch_size", "lpaff.head_epochs", "pseudo.labels")
        return LoopSettings(stage="pretrain", data=self.cfg.data, batch_size=s.batch_size,
                            epochs=s.head_epochs + s.epochs, checkpoint=base.checkpoint, lr=s.lr, momentum=s.momentum,
                            weight_decay=s.weight_decay, identity=identity)

    def bind(self, facts: DataFacts, device) -> None:
        super().bind(facts, device)
        init, p = self.settings.init, self.cfg.pseudo
        if init is None:
            raise ConfigError("lpaff.init is not set: point it at the pretraining checkpoint.pt to post-process "
                              "(e.g. lpaff.init=runs/dynacl/checkpoint.pt), or run dynacl.post=true in the pipeline")
        if not Path(init).is_file():
            raise ConfigError(f"lpaff.init: file {init} does not exist; point it at a pretraining checkpoint.pt "
                              "(pretrain first with tools/pretrain.py)")
        if p.labels is None:
            raise ConfigError("lpaff needs pseudo.labels (k-means of the init encoder's features, tools/cluster.py "
                              f"with pseudo.fpre={init}); set pseudo.labels=<pseudo_labels.npy>")
        labels = load_pseudo_labels(p.labels, facts.num_samples, p.ks)[:, 0]
        self.labels = torch.as_tensor(labels, dtype=torch.long, device=device)

    def build_model(self) -> AdvCLNet:
        """The init encoder (its branches and weights) + a zero-initialised Linear(feat_dim, K), K = pseudo.ks[0];
        BN branches other than the served one are frozen (they see no data)."""
        init, m = self.settings.init, self.cfg.model
        encoder, info = load_encoder(init, "cpu")
        if (info["arch"], info["width"]) != (m.arch, m.width):
            raise ConfigError(f"lpaff.init {init} holds a {info['arch']} of width {info['width']}; set model.arch="
                              f"{info['arch']} model.width={info['width']} (the checkpoint written here records them)")
        if len(info["branches"]) > 1 and self.branch not in info["branches"]:
            raise ConfigError(f"finetune.bn_branch={self.branch!r} is not a BN branch of {init} "
                              f"({info['branches']}); choose one of them")
        model = AdvCLNet(encoder, pseudo_ks=(self.cfg.pseudo.ks[0],), projector=False)
        torch.nn.init.zeros_(model.pseudo_heads[0].weight)  # LPAFT_AFF.py: fc weight and bias zero
        torch.nn.init.zeros_(model.pseudo_heads[0].bias)
        for bn in encoder.modules():
            if isinstance(bn, BranchBatchNorm) and len(bn.bns) > 1:
                for name, sub in bn.bns.items():
                    sub.requires_grad_(name == self.branch)
        self.encoder_params = [p for p in encoder.parameters() if p.requires_grad]
        self.init_info = info
        return model.train()

    def lr_factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        s, epoch = self.settings, step // steps_per_epoch
        if epoch < s.head_epochs:
            return s.head_lr / s.lr
        return s.gamma ** sum(epoch - s.head_epochs >= m for m in s.milestones)

    def probing_step(self, ctx: StepContext, x: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """Phase 1 on the GLOBAL batch, computed alike on every rank: the frozen encoder's features are gathered
        (no gradient flows into it, so DDP, which needs every parameter it tracks to get one, is bypassed), and
        the identical head gradients need no all-reduce. The encoder's parameters get no gradient at all (not
        zero: SGD's weight decay and momentum then leave them bit-equal)."""
        module = ctx.module
        for p in self.encoder_params:
            p.requires_grad_(False)
        module.encoder.eval()
        with torch.no_grad():
            features = module.encoder(x, ((self.branch, x.shape[0]),))
        features, _ = gather_rows(features)  # every rank has the same number of rows: no counts, no host sync
        labels, _ = gather_rows(labels)
        logits = module.pseudo_heads[0](features)
        loss = F.cross_entropy(at_least_fp32(logits), labels, ignore_index=-1)
        return StepOutput(loss, {"loss": loss.detach(), "loss_ce": loss.detach(), **accuracy(logits, labels)})

    def training_step(self, ctx: StepContext) -> StepOutput:
        v, a, s = self.cfg.views, self.cfg.attack, self.settings
        x = crop_flip_view(ctx.images, ctx.random, size=v.size, padding=v.padding)
        labels = self.labels[ctx.indices]
        if ctx.epoch < s.head_epochs:
            return self.probing_step(ctx, x, labels)
        module, b = ctx.module, x.shape[0]
        for p in self.encoder_params:
            p.requires_grad_(True)
        one = ((self.branch, b),)
        module.eval()  # the attack: BN running statistics, against the clean prediction computed once
        with torch.no_grad():
            clean_eval = module(x, one)["pseudo_logits"][0]
        x_adv = pgd(lambda z: trades_kl(module(z, one)["pseudo_logits"][0], clean_eval), x, a.eps, a.step_size,
                    a.supervised_steps, a.random_start, ctx.random).x_adv
        module.train()
        clean, adv = ctx.model(torch.cat([x, x_adv]), one * 2)["pseudo_logits"][0].chunk(2)
        loss = trades_objective(clean, adv, labels, s.trades_beta)
        return StepOutput(loss, {"loss": loss.detach(), **accuracy(adv, labels, "adv_accuracy")})

    def checkpoint_facts(self, finished: bool) -> dict:
        return {"lpaff": {"init": str(Path(self.settings.init).resolve()), "init_method": self.init_info["method"],
                          "pseudo_labels": str(self.cfg.pseudo.labels), "k": self.cfg.pseudo.ks[0]}}

    def describe(self) -> str:
        s = self.settings
        return (f"lpaff ({s.head_epochs} epochs linear probing + {s.epochs} epochs TRADES on "
                f"{self.cfg.pseudo.ks[0]} pseudo-classes, branch {self.branch}) from {s.init}")


def accuracy(logits: torch.Tensor, labels: torch.Tensor, name: str = "accuracy") -> dict[str, torch.Tensor]:
    """{name: % of the labelled rows whose argmax is their pseudo-label} (a detached device scalar)."""
    labelled = labels >= 0
    hits = ((logits.detach().argmax(1) == labels) & labelled).sum()
    return {name: hits.float() * 100 / labelled.sum().clamp(min=1)}


__all__ = ["LPAFF", "LPAFFSettings", "trades_objective"]
