"""DeACL (Zhang et al., ECCV 2022): a standard self-supervised teacher, then adversarial distillation.

Stage 1 is a standard SimCLR encoder (our `simclr` method; the pipeline pretrains it and sets `deacl.teacher`).
Stage 2, this method, as the authors' code computes it (pantheon5100/DeACL: solo/methods/mocov2_distillation_AT.py
MoCoV2KDAT with `--projector_ablation remove`, run by bash_files/DeACL_cifar10_resnet18.sh), per batch:

- one view x: RandomCrop(32, padding 4) + flip (the "weak" augmentation, solo/utils/pretrain_dataloader_AdvTraining.py);
  the teacher and the student both see it;
- the target t = f_T(x), the frozen teacher's encoder features (eval mode, no gradient; no projection head:
  the teacher's projector and the student's are `nn.Identity`);
- the attack: x' = x + δ maximising −cos(f_S(x + δ), t), the student's BatchNorm in eval mode
  (generate_training_AE: backbone.eval());
- the loss  L = −cos(f_S(x), t) − λ · cos(f_S(x'), f_S(x)),  λ = 2 (`--trades_k 2`), both means over the
  batch; the gradient reaches f_S(x) through both terms (nothing is detached but the teacher); the student
  forwards [x; x'] as one batch (one set of BatchNorm statistics for both);
- the student starts from the teacher's weights (solo/methods/base_for_adversarial_training.py loads them
  into the student unless `--student_scratch`, which the scripts do not pass): `deacl.init_from_teacher`.

The teacher is method state, not part of the trained network: it is loaded in `bind` (every rank reads the
checkpoint itself; nothing is broadcast), kept in eval mode on the rank's device with requires_grad off, and
lives outside the model `build_model` returns, so it is in neither the optimiser, the saved weights, nor DDP's
view (no unused parameters). Each rank computes the targets of its own rows only; the loss is a per-sample
mean, so DDP's gradient average is the gradient of the global batch's loss.

Not reproduced: the authors' online linear classifier trained on detached features with labels (a training-
time monitor that does not reach the encoder), and their input normalisation layer (our encoders take raw
[0, 1] images, teacher and student alike).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGDResult, pgd, ramp
from ..config import ConfigError
from ..data.augment import crop_flip_view
from ..engine.checkpoint import load_encoder
from ..engine.objective import DataFacts
from ..models import AdvCLNet, build_model, views_plan
from .base import Method, StepContext, StepOutput, bn_mode, register


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def deacl_loss(f_clean: torch.Tensor, f_adv: torch.Tensor, target: torch.Tensor, weight: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, distillation term, robustness term) with L = −mean cos(f_clean, target) − weight · mean cos(f_adv, f_clean).

    `target` is the teacher's features (given without gradient); the student's clean features get gradient
    from both terms (mocov2_distillation_AT.py training_step).
    """
    with torch.autocast(f_clean.device.type, enabled=False):
        f_clean, f_adv, target = map(_at_least_fp32, (f_clean, f_adv, target))
        distill = -F.cosine_similarity(f_clean, target, dim=1).mean()
        robust = -F.cosine_similarity(f_adv, f_clean, dim=1).mean()
        return distill + weight * robust, distill, robust


def away_from_target(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The attack's objective: −mean cos(f_S(x + δ), t) (the authors sum ×256; a sign step does not see the scale)."""
    with torch.autocast(features.device.type, enabled=False):
        return -F.cosine_similarity(_at_least_fp32(features), _at_least_fp32(target), dim=1).mean()


@dataclass
class DeACLSettings:
    """The `deacl` config section (defaults: the authors' CIFAR-10 ResNet-18 run, pantheon5100/DeACL)."""

    # checkpoint.pt of a standard self-supervised encoder (our `simclr` run); the pipeline fills it
    teacher: str | None = None
    # λ of the robustness term −cos(f(x'), f(x)): bash_files/DeACL_cifar10_resnet18.sh `--trades_k 2`
    robust_weight: float = 2.0
    # the student starts from the teacher's weights (base_for_adversarial_training.py, no --student_scratch)
    init_from_teacher: bool = True

    def check(self, need) -> None:
        need(self.robust_weight >= 0, "robust_weight", "must be >= 0")


@register("deacl", settings=DeACLSettings)
class DeACL(Method):
    """Student: encoder only (one BN, no projection head); the teacher is `self.teacher` after `bind`."""

    branches = ("normal",)
    needs = frozenset({"teacher"})
    teacher: nn.Module | None = None
    teacher_info: dict | None = None

    def bind(self, facts: DataFacts, device) -> None:
        super().bind(facts, device)
        self.teacher, self.teacher_info = load_teacher(self.settings.teacher, self.device)

    def build_model(self) -> AdvCLNet:
        if self.teacher is None:
            raise RuntimeError("DeACL.build_model needs the teacher: bind the method first")
        m, info = self.cfg.model, self.teacher_info
        net = build_model(m.arch, m.width, self.branches, projector=False, init=m.init)
        if net.feat_dim != self.teacher.feat_dim:
            raise ConfigError(
                f"deacl.teacher {info['checkpoint']}: its features are {self.teacher.feat_dim}-d (model.arch="
                f"{info['arch']}, model.width={info['width']}) but the student's are {net.feat_dim}-d (model.arch="
                f"{m.arch}, model.width={m.width}); DeACL matches them by cosine similarity: set model.arch/width "
                "to the teacher's, or pretrain a teacher with the student's")
        if self.settings.init_from_teacher:
            if (info["arch"], info["width"]) != (m.arch, m.width):
                raise ConfigError(
                    f"deacl.init_from_teacher=true copies the teacher's weights, but the teacher is model.arch="
                    f"{info['arch']}, model.width={info['width']} and the student model.arch={m.arch}, "
                    f"model.width={m.width}: make them equal, or set deacl.init_from_teacher=false")
            net.encoder.load_state_dict(one_branch_weights(self.teacher.state_dict(), self.teacher_branch, "normal"))
        return net

    @property
    def teacher_branch(self) -> str:
        return "normal" if "normal" in self.teacher_info["branches"] else self.teacher_info["branches"][0]

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x, views_plan((self.teacher_branch,), x.shape[0]))

    def attack(self, module: nn.Module, x: torch.Tensor, target: torch.Tensor, generator, share: float = 1.0
               ) -> PGDResult:
        """x + δ maximising −cos(f_S(x + δ), t) with the student's BatchNorm in eval mode."""
        a, plan = self.cfg.attack, views_plan(("normal",), x.shape[0])
        with bn_mode(module):
            return pgd(lambda x_adv: away_from_target(module(x_adv, plan)["features"], target), x,
                       a.eps * share, a.step_size * share, a.steps, a.random_start, generator)

    def training_step(self, ctx: StepContext) -> StepOutput:
        v, b = self.cfg.views, ctx.images.shape[0]
        x = crop_flip_view(ctx.images, ctx.random, size=v.size, padding=v.padding)
        target = self.targets(x)
        share = ramp(ctx.step, ctx.steps_per_epoch, self.cfg.attack.eps_ramp_epochs)
        adv = self.attack(ctx.module, x, target, ctx.random, share)
        features = ctx.model(torch.cat([x, adv.x_adv]), (("normal", 2 * b),))["features"]
        loss, distill, robust = deacl_loss(features[:b], features[b:], target, self.settings.robust_weight)
        metrics = {"loss": loss.detach(), "loss_distill": distill.detach(), "loss_robust": robust.detach(),
                   "attack_gain": adv.last_loss - adv.initial_loss}
        return StepOutput(loss, metrics)

    def checkpoint_facts(self, finished: bool) -> dict:
        return {"teacher": dict(self.teacher_info)} if self.teacher_info else {}


def load_teacher(path: str | None, device: torch.device) -> tuple[nn.Module, dict]:
    """The frozen teacher encoder (eval mode, no gradients) of the checkpoint at `deacl.teacher`, safely loaded."""
    make_one = ("the pipeline (tools/pipeline.py) fills it with its SimCLR stage's checkpoint; alone, pretrain one "
                "with `tools/pretrain.py train.method=simclr` (same model.arch/model.width) and pass "
                "deacl.teacher=<that run>/checkpoint.pt")
    if path is None:
        raise ConfigError(f"deacl.teacher is null: DeACL distils a standard self-supervised teacher; {make_one}")
    if not Path(path).is_file():
        raise ConfigError(f"deacl.teacher={path} is not a file; {make_one}")
    try:
        encoder, info = load_encoder(path, device)
    except ConfigError as e:  # a classifier, another program's file: say which setting named it
        raise type(e)(f"deacl.teacher: {e}") from None
    if len(info["branches"]) > 1 and "normal" not in info["branches"]:
        raise ConfigError(f"deacl.teacher {path} has BN branches {info['branches']} and no 'normal' (clean) one; "
                          "give a standard self-supervised checkpoint (e.g. train.method=simclr)")
    return encoder.eval().requires_grad_(False), info


def one_branch_weights(state: dict, branch: str, name: str) -> dict:
    """An encoder state dict reduced to BN branch `branch`, renamed `name` (for a one-branch student)."""
    out = {}
    for key, value in state.items():
        if ".bns." in key:
            head, rest = key.split(".bns.", 1)
            found, tail = rest.split(".", 1)
            if found != branch:
                continue
            key = f"{head}.bns.{name}.{tail}"
        out[key] = value
    return out
