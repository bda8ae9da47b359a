"""The training loop shared by every pretraining method.

loader (uint8) → device → method step (views, attacks, one multi-branch forward) → one backward →
SGD with warm-up + cosine, through DDP or DeepSpeed (engine/backends.py). bf16 autocast and
channels_last on GPU; an atomic checkpoint every `train.ckpt_every` steps to one fixed file;
auto-resume from it, replaying the data order and the augmentation/attack randomness exactly.
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
from ..data.source import training_data
from ..distributed import DistInfo, barrier, distributed_session, init_distributed, node_names
from ..methods import Method, build_method
from ..models.sync_bn import convert_sync_batchnorm
from ..rng import StepRandom
from .backends import build_engine
from .checkpoint import write_json, write_text
from .metrics import MetricLogger, NonFiniteLossError
from .preemption import active_stop_request
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
        self.data = training_data(cfg.data, t.batch_size // self.dist.world_size, seed=t.seed, rank=self.dist.rank,
                                  world_size=self.dist.world_size, device=self.device)
        self.loader = self.data.loader
        if self.loader.batches_per_epoch == 0:
            raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {self.data.num_samples} "
                              "training images")
        self.method: Method = build_method(cfg, self.data.num_samples, self.device, self.data.num_classes)
        torch.manual_seed(t.seed)
        model = self.method.build_model().to(self.device)
        if t.sync_bn and self.dist.world_size > 1:
            model = convert_sync_batchnorm(model, self.device)
        self.channels_last = t.channels_last and self.device.type == "cuda"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        o = cfg.optim
        optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        self.steps_per_epoch = self.loader.batches_per_epoch
        self.total_steps = t.epochs * self.steps_per_epoch
        schedule = partial(warmup_cosine, total_steps=self.total_steps,
                           warmup_steps=round(o.warmup_epochs * self.steps_per_epoch), lr=o.lr, min_lr=o.min_lr,
                           warmup_start_lr=o.warmup_start_lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s) / o.lr)
        self.engine = build_engine(t.engine, model, optimizer, scheduler, self.dist, self.loader.batch_size,
                                   t.zero_stage)
        # Views and attacks reseed from (seed, step) every step: nothing to checkpoint, and a sample's
        # views do not depend on the number of ranks (see rng.StepRandom).
        self.random = StepRandom(self.device, t.seed, self.dist.rank, self.dist.world_size)
        self.step = 0
        self.stopped_by_signal = False

    @property
    def model(self) -> torch.nn.Module:
        """The plain network (not the DDP / DeepSpeed wrapper)."""
        return self.engine.module

    # -- checkpoint -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def facts(self, finished: bool = False) -> dict:
        """What a checkpoint records beside the weights and optimizer state."""
        return {"step": self.step, "total_steps": self.total_steps, "finished": finished,
                "method": self.cfg.train.method, "num_classes": self.method.num_classes,
                "world_size": self.dist.world_size, "engine": self.cfg.train.engine, "config": to_yaml(self.cfg)}

    def save(self, finished: bool = False) -> None:
        self.engine.save(self.checkpoint_path, self.facts(finished))

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = self.engine.load(self.checkpoint_path)
        changed = changed_keys(state["config"], to_yaml(self.cfg))
        if changed and self.dist.is_main:
            print(f"[pretrain] warning: resuming {self.checkpoint_path} with a changed config: {', '.join(changed)}",
                  flush=True)
        self.step = state["step"]
        return True

    def _provenance(self, resumed: bool, nodes: list[str]) -> dict:
        """run.json for this session; a resumed run keeps its first start and lists where it resumed."""
        info = run_info(self.dist.world_size, nodes, self.device)
        info.update(launcher=self.dist.launcher, engine=self.cfg.train.engine, sync_bn=self.cfg.train.sync_bn)
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
        nodes = node_names()  # a collective: every rank takes part
        if main:
            write_text(to_yaml(cfg), self.out / "config.yaml")
            info = self._provenance(resumed, nodes)
            write_json(info, self.out / "run.json")
            print(self._header(resumed), flush=True)
        logger = MetricLogger(self.out, self.total_steps, self.step, cfg.train.batch_size, enabled=main)
        stop = active_stop_request()
        try:
            self._loop(logger, stop_after_steps, on_step, stop)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}. Training stopped; the last good checkpoint ({self.checkpoint_path}) "
                                     "is kept. Lower optim.lr or check the data.") from None
        finally:
            logger.close()
        if stop is not None:
            stop.close()
        if main:
            info["end"] = now()
            info["steps_done"] = self.step
            info["finished"] = self.step >= self.total_steps
            if self.stopped_by_signal:
                info["stopped_by_signal"] = True
            write_json(info, self.out / "run.json")
        barrier()  # no rank returns before rank 0's last checkpoint and run.json are written
        return self.out

    def _header(self, resumed: bool) -> str:
        cfg, w = self.cfg, self.dist.world_size
        left_out = self.data.num_samples - self.steps_per_epoch * cfg.train.batch_size
        ranks = (f"{w} ranks × {cfg.train.batch_size // w} images ({cfg.train.engine}"
                 + (", SyncBN" if cfg.train.sync_bn else "") + ")") if w > 1 else "1 process"
        return (f"[pretrain] {cfg.train.method} on {cfg.data.name}: {self.data.num_samples} images "
                f"({self.data.description}), "
                f"{self.steps_per_epoch} steps/epoch of {cfg.train.batch_size} on {ranks}, "
                f"{self.total_steps} steps, device {self.device}"
                + (f"; each epoch leaves out {left_out} images (the partial last batch; reshuffled every epoch)"
                   if left_out else "")
                + (f", resumed at step {self.step}" if resumed else "") + f" → {self.out}")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on a loader batch; returns its metrics as device tensors.

        Nothing here waits for the device (tests/test_engine.py checks it with `HostSyncRecorder`): the
        loader's batches are pinned, their copies non-blocking, and metrics are read only at `flush`.
        """
        # channels_last lives in the weights: convolutions then return channels_last activations.
        images = images.to(self.device, non_blocking=True)
        indices = indices.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        engine = self.engine
        with autocast_for(self.cfg, self.device):
            out = self.method.training_step(engine.model, images, indices, self.random.reseed(self.step),
                                            engine.module, labels)
        engine.update(out.loss)
        self.step += 1
        return out.metrics

    def _loop(self, logger: MetricLogger, stop_after_steps, on_step, stop=None) -> None:
        t = self.cfg.train
        last = min(self.total_steps, stop_after_steps or self.total_steps)
        engine = self.engine
        engine.module.train()
        while self.step < last:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            self.loader.set_epoch(epoch, start_batch=skip)
            for images, labels, indices in self.loader:
                logger.update(self.train_step(images, labels, indices))
                record = None
                if self.step % t.log_every == 0 or self.step % t.ckpt_every == 0 or self.step == last:
                    record = logger.flush(self.step, epoch, engine.lr)
                saved = self.step % t.ckpt_every == 0 or self.step == last
                if saved:
                    self.save(finished=self.step == self.total_steps)
                if on_step is not None:
                    on_step(self, record or {})
                if self.step >= last:
                    return
                if stop is not None and stop.agreed():
                    # The launcher's warning signal (time limit / preemption): keep every finished step.
                    if not saved:
                        logger.flush(self.step, epoch, engine.lr)
                        self.save()
                    self.stopped_by_signal = True
                    if self.dist.is_main:
                        print(f"[pretrain] stopped at step {self.step} of {self.total_steps} on the launcher's "
                              f"signal; checkpoint {self.checkpoint_path} written, the requeued job resumes there",
                              flush=True)
                    return


def pretrain(cfg: Config, stop_after_steps: int | None = None) -> Path:
    """Run (or resume) pretraining as configured, on every rank the launcher started; returns the run folder."""
    with distributed_session(cfg.train.device) as dist_info:
        return Trainer(cfg, dist_info).fit(stop_after_steps)
