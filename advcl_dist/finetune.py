"""Finetuning a pretrained encoder into a classifier: SLF, ALF and AFF (DESIGN §1).

- SLF: the encoder frozen in eval mode (BN branch `finetune.bn_branch`), a linear head on clean views;
- ALF: the same, the head trained on PGD examples (attack.supervised_steps, PGD-10);
- AFF: the whole network, TRADES (clean CE + β·KL(clean || adversarial), inner PGD-10).
Views are RandomCrop(padding) + flip, made on the device. The run checkpoints every epoch to
`classifier.pt` and resumes from it; the finished file is what `evaluate.load_classifier` reads.
No selection on the test set: the last epoch is kept, or, with `finetune.val_fraction` > 0, the
epoch with the best robust accuracy on a split held out of the training set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from .attacks import pgd
from .config import Config, ConfigError, to_yaml
from .data import build_loader, get_dataset, num_classes
from .data.augment import crop_flip_view
from .distributed import node_names, pick_device
from .engine.checkpoint import load_checkpoint, load_encoder, save_checkpoint, write_json, write_text
from .engine.metrics import MetricLogger
from .engine.run_info import now, run_info
from .evaluate import evaluate, robust_accuracy
from .losses import trades_kl
from .models import Classifier

CLASSIFIER = "classifier.pt"
DEFAULT_LR = {"slf": 0.01, "alf": 0.01, "aff": 0.1}


def finetune_dataset(cfg: Config) -> tuple[str, str | None]:
    """(name, root) of the finetuning data: `finetune.dataset` (transfer) or the pretraining dataset."""
    f = cfg.finetune
    return f.dataset or cfg.data.name, f.root if f.root is not None else cfg.data.root


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/val indices, a seeded permutation; val is empty when val_fraction is 0."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def linear_only(mode: str) -> bool:
    return mode in ("slf", "alf")


class Finetuner:
    def __init__(self, cfg: Config):
        f = cfg.finetune
        if f.checkpoint is None:
            raise ConfigError("finetune.checkpoint is not set; point it at a pretraining checkpoint.pt")
        self.cfg, self.mode, self.out = cfg, f.mode, Path(cfg.out_dir)
        self.device = pick_device(cfg.train.device)
        name, root = finetune_dataset(cfg)
        full = get_dataset(name, "train", root, cfg.data.download)
        self.classes = num_classes(full)
        if self.classes < 2:
            raise ConfigError(f"finetune.dataset={name}: its train split has no labels to finetune on")
        train_idx, val_idx = split_train_val(len(full), f.val_fraction, cfg.train.seed)
        self.train_set = Subset(full, train_idx.tolist()) if len(val_idx) else full
        self.val_set = Subset(full, val_idx.tolist()) if len(val_idx) else None
        self.loader = build_loader(self.train_set, min(f.batch_size, len(self.train_set)), shuffle=True,
                                   drop_last=False, workers=cfg.data.workers, seed=cfg.train.seed,
                                   image_size=cfg.views.size)
        torch.manual_seed(cfg.train.seed)
        encoder, self.pretrained = load_encoder(f.checkpoint, self.device)
        if not self.pretrained["finished"]:
            print(f"[finetune] warning: {f.checkpoint} is an unfinished pretraining run "
                  f"(step {self.pretrained['step']})", flush=True)
        self.model = Classifier(encoder, self.classes, f.bn_branch).to(self.device)
        if linear_only(self.mode):
            self.model.encoder.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=f.lr or DEFAULT_LR[self.mode], momentum=f.momentum,
                                         weight_decay=f.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, f.milestones, f.gamma)
        self.generator = torch.Generator(self.device).manual_seed(cfg.train.seed * 1000 + 17)
        self.epoch, self.best = 0, None
        self.meta = {"arch": self.pretrained["arch"], "width": self.pretrained["width"],
                     "branches": self.pretrained["branches"], "branch": f.bn_branch, "num_classes": self.classes,
                     "image_size": cfg.views.size, "dataset": name, "method": self.pretrained["method"],
                     "finetune": self.mode, "pretrained": self.pretrained["checkpoint"]}

    @property
    def path(self) -> Path:
        return self.out / CLASSIFIER

    def save(self, finished: bool) -> None:
        served = self.best["model"] if finished and self.best is not None else self.model.state_dict()
        save_checkpoint({"classifier": self.meta, "model": served, "current": self.model.state_dict(),
                         "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "generator": self.generator.get_state(), "epoch": self.epoch, "finished": finished,
                         "best": self.best, "selected_epoch": self.selected_epoch(), "config": to_yaml(self.cfg)},
                        self.path)

    def selected_epoch(self) -> int:
        return self.best["epoch"] if self.best is not None else self.epoch

    def resume(self) -> bool:
        if not self.path.exists():
            return False
        state = load_checkpoint(self.path, self.device)
        self.model.load_state_dict(state["current"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].to("cpu"))
        self.epoch, self.best = state["epoch"], state["best"]
        return True

    # -- one step per mode ------------------------------------------------------------------------
    def _pgd(self, objective, x):
        a = self.cfg.attack
        return pgd(objective, x, a.eps, a.step_size, a.supervised_steps, a.random_start, self.generator).x_adv

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and the logits it was computed on (clean for SLF, adversarial for ALF and AFF)."""
        v, model = self.cfg.views, self.model
        x = crop_flip_view(images, self.generator, size=v.size, padding=v.padding)
        if self.mode == "slf":
            logits = model(x)
            return F.cross_entropy(logits, labels), logits
        if self.mode == "alf":
            logits = model(self._pgd(lambda z: F.cross_entropy(model(z), labels), x))
            return F.cross_entropy(logits, labels), logits
        # AFF / TRADES: the attack runs in eval mode against the clean prediction, computed once.
        model.eval()
        with torch.no_grad():
            clean_eval = model(x)
        x_adv = self._pgd(lambda z: trades_kl(model(z), clean_eval), x)
        model.train()
        clean, adv = model(torch.cat([x, x_adv]), views=2).chunk(2)
        return F.cross_entropy(clean, labels) + self.cfg.finetune.trades_beta * trades_kl(adv, clean), adv

    def set_train_mode(self) -> None:
        self.model.train()
        if linear_only(self.mode):
            self.model.encoder.eval()  # frozen: BN uses the pretrained running statistics

    # -- loop -------------------------------------------------------------------------------------
    def fit(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.resume()
        if resumed and self.epoch >= self.cfg.finetune.epochs:
            print(f"[finetune] already finished ({self.path}); nothing to do", flush=True)
            return self.path
        write_text(to_yaml(self.cfg), self.out / "config.yaml")
        info = run_info(1, node_names(), self.device)
        write_json(info, self.out / "run.json")
        f, steps = self.cfg.finetune, self.loader.batches_per_epoch
        print(f"[finetune] {self.mode.upper()} of {self.meta['method']} ({f.checkpoint}) on {self.meta['dataset']}: "
              f"{len(self.train_set)} images, {f.epochs} epochs, device {self.device}"
              + (f", resumed at epoch {self.epoch}" if resumed else "") + f" → {self.out}", flush=True)
        logger = MetricLogger(self.out, f.epochs * steps, self.epoch * steps, self.loader.batch_size)
        try:
            while self.epoch < f.epochs:
                self.set_train_mode()
                self.loader.set_epoch(self.epoch)
                for images, labels, _ in self.loader:
                    images, labels = images.to(self.device), labels.to(self.device)
                    loss, logits = self.step(images, labels)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    logger.update({"loss": loss.detach(),
                                   "train_accuracy": (logits.detach().argmax(1) == labels).float().mean() * 100})
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                self.epoch += 1
                logger.flush(self.epoch * steps, self.epoch, lr)
                self.validate()
                self.save(finished=self.epoch >= f.epochs)
        finally:
            logger.close()
        info.update(end=now(), finished=True, selected_epoch=self.selected_epoch())
        write_json(info, self.out / "run.json")
        return self.path

    def validate(self) -> None:
        """With a validation split: robust accuracy on it; keep the best epoch's weights."""
        if self.val_set is None:
            return
        self.model.eval()
        a = self.cfg.attack
        val = robust_accuracy(self.model, self.val_set, a.eps, a.step_size, a.eval_steps, self.cfg.eval.batch_size,
                              self.cfg.views.size, self.cfg.eval.seed)
        print(f"[finetune] epoch {self.epoch}: val SA {val['SA']:.2f} RA {val['RA']:.2f}", flush=True)
        if self.best is None or val["RA"] >= self.best["RA"]:
            weights = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.best = {"epoch": self.epoch, **val, "model": weights}


def finetune(cfg: Config, evaluate_after: bool = True) -> Path:
    """Finetune as configured (resuming if interrupted), then evaluate into `<out_dir>/results.json`."""
    path = Finetuner(cfg).fit()
    if evaluate_after:
        evaluate(cfg, checkpoint=path)
    return path
