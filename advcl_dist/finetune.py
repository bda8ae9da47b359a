"""Finetuning a pretrained encoder into a classifier: SLF, ALF and AFF as objectives of the shared loop.

- SLF: the encoder frozen in eval mode (BN branch `finetune.bn_branch`), a linear head on clean views;
- ALF: the same, the head trained on PGD examples (attack.supervised_steps, PGD-10);
- AFF: the whole network, TRADES (clean CE + β·KL(clean || adversarial), inner PGD-10).
They run in engine/trainer.py like pretraining: every rank of a launch (DDP or DeepSpeed, the global
`finetune.batch_size` split over the ranks), bf16 autocast and channels_last on GPU, step checkpoints
to `classifier.pt`, auto-resume, graceful stop. Views are RandomCrop(padding) + flip, made on the device
from the step's `StepRandom`; the attacks run on the plain module. No selection on the test set: the
last epoch is kept, or, with `finetune.val_fraction` > 0, the epoch with the best robust accuracy on a
split held out of the training set (evaluated sharded over the ranks).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .attacks import pgd
from .config import Config, ConfigError
from .data.augment import crop_flip_view
from .data.source import finetune_data, image_source
from .distributed import distributed_session
from .engine.checkpoint import load_encoder
from .engine.objective import DataFacts, EpochContext, LoopSettings, Objective, StepContext, StepOutput
from .engine.preemption import StopRequest
from .engine.trainer import Trainer
from .evaluate import evaluate, robust_accuracy
from .folder_lock import folder_lock
from .losses import trades_kl
from .models import BranchBatchNorm, Classifier

CLASSIFIER = "classifier.pt"
DEFAULT_LR = {"slf": 0.01, "alf": 0.01, "aff": 0.1}


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/val indices, a seeded permutation; val is empty when val_fraction is 0."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class Finetuning(Objective):
    """SLF / ALF / AFF (`finetune.mode`) of the encoder in `finetune.checkpoint`."""

    def __init__(self, cfg: Config):
        f = cfg.finetune
        if f.checkpoint is None:
            raise ConfigError("finetune.checkpoint is not set; point it at a pretraining checkpoint.pt")
        self.cfg, self.mode = cfg, f.mode
        self.name = f.mode
        self.data = finetune_data(cfg, "train", f.beton)
        self.best: dict | None = None  # {"epoch", "SA", "RA", "model"} of the best validation RA so far
        self.val_indices: np.ndarray | None = None

    @property
    def linear_only(self) -> bool:
        return self.mode in ("slf", "alf")

    def loop_settings(self) -> LoopSettings:
        f = self.cfg.finetune
        return LoopSettings(stage="finetune", data=self.data, batch_size=f.batch_size, epochs=f.epochs,
                            checkpoint=CLASSIFIER, lr=f.lr or DEFAULT_LR[self.mode], momentum=f.momentum,
                            weight_decay=f.weight_decay, subset=self._train_subset,
                            identity=("finetune.mode", "finetune.checkpoint", "finetune.dataset",
                                      "finetune.batch_size", "finetune.bn_branch", "finetune.val_fraction",
                                      "views.size"))

    def _train_subset(self, num_samples: int):
        """Without a validation split every image trains; with one, the rest of a seeded permutation."""
        f = self.cfg.finetune
        if f.val_fraction == 0:
            return None
        train, self.val_indices = split_train_val(num_samples, f.val_fraction, self.cfg.train.seed)
        return train

    def bind(self, facts: DataFacts, device: torch.device) -> None:
        if facts.num_classes < 2:
            raise ConfigError(f"finetune.dataset={self.data.name}: its train split has no labels to finetune on")
        self.classes, self.device = facts.num_classes, device

    def build_model(self) -> Classifier:
        f = self.cfg.finetune
        encoder, self.pretrained = load_encoder(f.checkpoint, "cpu")
        if not self.pretrained["finished"]:
            print(f"[finetune] warning: {f.checkpoint} is an unfinished pretraining run "
                  f"(step {self.pretrained['step']})", flush=True)
        model = Classifier(encoder, self.classes, f.bn_branch)
        if self.linear_only:
            model.encoder.requires_grad_(False)
        for bn in model.encoder.modules():
            if isinstance(bn, BranchBatchNorm) and len(bn.bns) > 1:
                # Only `finetune.bn_branch` sees data: the other branches get no gradient, which DDP rejects
                # and weight decay would still move (DeepSpeed, ZeRO).
                for name, branch in bn.bns.items():
                    if name != f.bn_branch:
                        branch.requires_grad_(False)
        return model

    def lr_factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """× gamma at every milestone epoch passed (the authors' MultiStepLR, applied per step)."""
        f, epoch = self.cfg.finetune, step // steps_per_epoch
        return f.gamma ** sum(epoch >= m for m in f.milestones)

    def train_mode(self, model: torch.nn.Module) -> None:
        model.train()
        if self.linear_only:
            model.encoder.eval()  # frozen: BN uses the pretrained running statistics

    def _pgd(self, objective, x, random):
        a = self.cfg.attack
        return pgd(objective, x, a.eps, a.step_size, a.supervised_steps, a.random_start, random).x_adv

    def training_step(self, ctx: StepContext) -> StepOutput:
        v, model, module, labels = self.cfg.views, ctx.model, ctx.module, ctx.labels
        x = crop_flip_view(ctx.images, ctx.random, size=v.size, padding=v.padding)
        if self.mode == "slf":
            logits = model(x)
            loss = F.cross_entropy(logits, labels)
        elif self.mode == "alf":
            x_adv = self._pgd(lambda z: F.cross_entropy(module(z), labels), x, ctx.random)
            logits = model(x_adv)
            loss = F.cross_entropy(logits, labels)
        else:  # AFF / TRADES: the attack runs in eval mode against the clean prediction, computed once.
            module.eval()
            with torch.no_grad():
                clean_eval = module(x)
            x_adv = self._pgd(lambda z: trades_kl(module(z), clean_eval), x, ctx.random)
            module.train()
            clean, logits = model(torch.cat([x, x_adv]), views=2).chunk(2)
            loss = F.cross_entropy(clean, labels) + self.cfg.finetune.trades_beta * trades_kl(logits, clean)
        accuracy = (logits.detach().argmax(1) == labels).float().mean() * 100
        return StepOutput(loss, {"loss": loss.detach(), "train_accuracy": accuracy})

    def on_epoch_end(self, ctx: EpochContext) -> None:
        """With a validation split: robust accuracy on it (sharded over the ranks); keep the best epoch."""
        if self.val_indices is None or len(self.val_indices) == 0:
            return
        a, e = self.cfg.attack, self.cfg.eval
        ctx.module.eval()
        val = robust_accuracy(ctx.module, image_source(self.data), self.val_indices.tolist(), a.eps, a.step_size,
                              a.eval_steps, e.batch_size, self.cfg.views.size, e.seed, ctx.dist)
        ctx.log(f"epoch {ctx.epoch}: val SA {val['SA']:.2f} RA {val['RA']:.2f} ({len(self.val_indices)} images)")
        if self.best is None or val["RA"] >= self.best["RA"]:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in ctx.module.state_dict().items()}
            self.best = {"epoch": ctx.epoch, **val, "model": weights}

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")

    def checkpoint_facts(self, finished: bool) -> dict:
        """What `evaluate.load_classifier` reads: how to rebuild the network, and which weights to serve."""
        f, p = self.cfg.finetune, self.pretrained
        meta = {"arch": p["arch"], "width": p["width"], "branches": p["branches"], "branch": f.bn_branch,
                "num_classes": self.classes, "image_size": self.cfg.views.size, "dataset": self.data.name,
                "method": p["method"], "finetune": self.mode, "pretrained": p["checkpoint"]}
        # The weights served once finished: the best validation epoch's (kept in the objective's state), else
        # the last epoch's ("model").
        selected = None
        if self.best is not None:
            selected = {"by": "val_RA", "epoch": self.best["epoch"], "SA": self.best["SA"], "RA": self.best["RA"]}
        return {"classifier": meta, "selected": selected}

    def describe(self) -> str:
        return (f"{self.mode.upper()} of {self.pretrained['method']} ({self.cfg.finetune.checkpoint})"
                + (f", validation on {len(self.val_indices)} held-out images" if self.val_indices is not None
                   and len(self.val_indices) else ""))


def finetune(cfg: Config, stop: StopRequest | None = None, evaluate_after: bool = True,
             stop_after_steps: int | None = None) -> Path:
    """Finetune as configured on every rank of the launch (resuming if interrupted), then evaluate into
    `<out_dir>/results.json`. Returns the classifier's path."""
    with distributed_session(cfg.train.device) as info, folder_lock(cfg.out_dir, info):
        trainer = Trainer(cfg, info, Finetuning(cfg))
        trainer.fit(stop_after_steps, stop=stop)
        if evaluate_after and trainer.step >= trainer.total_steps:
            evaluate(cfg, checkpoint=trainer.checkpoint_path, stop=stop, record_run=False)
        return trainer.checkpoint_path
