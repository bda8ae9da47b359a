"""The training loop shared by every pretraining method.

loader (uint8) → device → method step (views, attacks, one multi-branch forward) →
one backward → SGD with warm-up + cosine. bf16 autocast and channels_last on GPU;
an atomic checkpoint every `train.ckpt_every` steps to one fixed file; auto-resume
from it, replaying the data order and the augmentation/attack RNG exactly.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import yaml

from ..config import Config, ConfigError, to_yaml
from ..data import build_loader, get_dataset, num_classes
from ..distributed import DistInfo, init_distributed, node_names
from ..methods import Method, build_method
from .checkpoint import load_checkpoint, save_checkpoint, write_json, write_text
from .metrics import MetricLogger, NonFiniteLossError
from .run_info import now, run_info
from .schedule import warmup_cosine

CHECKPOINT = "checkpoint.pt"


def changed_keys(old_yaml: str, new_yaml: str) -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, val in node.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    old, new = flat(yaml.safe_load(old_yaml)), flat(yaml.safe_load(new_yaml))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def autocast_for(cfg: Config, device: torch.device):
    use_bf16 = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.out = Path(cfg.out_dir)
        t = cfg.train
        if t.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {self.dist.world_size} ranks")
        self.dataset = get_dataset(cfg.data.name, cfg.data.split, cfg.data.root, cfg.data.download)
        self.loader = build_loader(self.dataset, t.batch_size // self.dist.world_size, shuffle=True, drop_last=True,
                                   workers=cfg.data.workers, seed=t.seed, rank=self.dist.rank,
                                   world_size=self.dist.world_size, image_size=cfg.data.image_size)
        if self.loader.batches_per_epoch == 0:
            raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {len(self.dataset)} training images")
        self.method: Method = build_method(cfg, len(self.dataset), self.device, num_classes(self.dataset))
        torch.manual_seed(t.seed)
        self.model = self.method.build_model().to(self.device)
        self.channels_last = t.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay)
        self.steps_per_epoch = self.loader.batches_per_epoch
        self.total_steps = t.epochs * self.steps_per_epoch
        schedule = partial(warmup_cosine, total_steps=self.total_steps,
                           warmup_steps=round(o.warmup_epochs * self.steps_per_epoch), lr=o.lr, min_lr=o.min_lr,
                           warmup_start_lr=o.warmup_start_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: schedule(s) / o.lr)
        # Views and attacks draw from their own generator, so their randomness survives a resume.
        self.generator = torch.Generator(self.device).manual_seed(t.seed * 1000 + self.dist.rank)
        self.step = 0

    # -- checkpoint -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def state_dict(self, finished: bool = False) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "step": self.step, "total_steps": self.total_steps, "finished": finished,
                "method": self.cfg.train.method, "num_classes": self.method.num_classes,
                "config": to_yaml(self.cfg)}

    def save(self, finished: bool = False) -> None:
        if self.dist.is_main:
            save_checkpoint(self.state_dict(finished), self.checkpoint_path)

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = load_checkpoint(self.checkpoint_path, self.device)
        changed = changed_keys(state["config"], to_yaml(self.cfg))
        if changed and self.dist.is_main:
            print(f"[pretrain] warning: resuming {self.checkpoint_path} with a changed config: {', '.join(changed)}",
                  flush=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].to("cpu"))
        self.step = state["step"]
        return True

    def _provenance(self, resumed: bool) -> dict:
        """run.json for this session; a resumed run keeps its first start and lists where it resumed."""
        info = run_info(self.dist.world_size, node_names(), self.device)
        path = self.out / "run.json"
        previous = json.loads(path.read_text()) if resumed and path.exists() else {}
        info["start"] = previous.get("start", info["start"])
        info["resumes"] = previous.get("resumes", []) + ([{"step": self.step, "time": now()}] if resumed else [])
        return info

    # -- loop -------------------------------------------------------------------------------------
    def fit(self, stop_after_steps: int | None = None,
            on_step: Callable[[Trainer, dict], None] | None = None) -> Path:
        """Train to the end (or for `stop_after_steps` steps in total); returns the run folder."""
        cfg, main = self.cfg, self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.resume()
        if resumed and self.step >= self.total_steps:
            if main:
                print(f"[pretrain] already finished ({self.checkpoint_path}); nothing to do", flush=True)
            return self.out
        if main:
            write_text(to_yaml(cfg), self.out / "config.yaml")
            info = self._provenance(resumed)
            write_json(info, self.out / "run.json")
            print(f"[pretrain] {cfg.train.method} on {cfg.data.name}: {len(self.dataset)} images, "
                  f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, device {self.device}"
                  + (f", resumed at step {self.step}" if resumed else "") + f" → {self.out}", flush=True)
        logger = MetricLogger(self.out, self.total_steps, self.step, cfg.train.batch_size, enabled=main)
        try:
            self._loop(logger, stop_after_steps, on_step)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}. Training stopped; the last good checkpoint ({self.checkpoint_path}) "
                                     "is kept. Lower optim.lr or check the data.") from None
        finally:
            logger.close()
        if main:
            info["end"] = now()
            info["steps_done"] = self.step
            info["finished"] = self.step >= self.total_steps
            write_json(info, self.out / "run.json")
        return self.out

    def _loop(self, logger: MetricLogger, stop_after_steps, on_step) -> None:
        t = self.cfg.train
        last = min(self.total_steps, stop_after_steps or self.total_steps)
        raw_model = self.model
        self.model.train()
        while self.step < last:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            self.loader.set_epoch(epoch, start_batch=skip)
            for images, labels, indices in self.loader:
                # channels_last lives in the weights: convolutions then return channels_last activations.
                images = images.to(self.device, non_blocking=True)
                indices = indices.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with autocast_for(self.cfg, self.device):
                    out = self.method.training_step(self.model, images, indices, self.generator, raw_model, labels)
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                logger.update(out.metrics)
                record = None
                if self.step % t.log_every == 0 or self.step % t.ckpt_every == 0 or self.step == last:
                    record = logger.flush(self.step, epoch, self.optimizer.param_groups[0]["lr"])
                if self.step % t.ckpt_every == 0 or self.step == last:
                    self.save(finished=self.step == self.total_steps)
                if on_step is not None:
                    on_step(self, record or {})
                if self.step >= last:
                    return


def pretrain(cfg: Config, stop_after_steps: int | None = None) -> Path:
    """Run (or resume) pretraining as configured; returns the run folder."""
    return Trainer(cfg).fit(stop_after_steps)
