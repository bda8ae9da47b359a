"""The one training loop: pretraining methods and finetuning modes alike (engine/objective.py).

loader (uint8) → device → objective step (views, attacks, forward) → one backward → SGD with the
objective's schedule, through DDP or DeepSpeed (engine/backends.py). bf16 autocast on GPU (`train.amp`),
channels_last weights (`train.channels_last`); an atomic checkpoint every `train.ckpt_every`
steps to one fixed file; auto-resume from it, replaying the data order and the augmentation/attack
randomness exactly; a launcher's stop request (SIGUSR2 before a time limit) ends the loop at a step
boundary with the checkpoint written.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Config, ConfigError, to_yaml
from ..data.source import training_data
from ..distributed import DistInfo, barrier, distributed_session, init_distributed
from ..faults import fault_point
from ..folder_lock import folder_lock
from ..models.sync_bn import convert_sync_batchnorm
from ..rng import StepRandom
from ..run_folder import RunFolder, is_finished
from .backends import build_engine
from .metrics import MetricLogger, NonFiniteLossError
from .objective import DataFacts, EpochContext, Objective, StepContext
from .preemption import StopRequest, signal_name

CHECKPOINT = "checkpoint.pt"


def autocast_for(cfg: Config, device: torch.device):
    use_bf16 = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    """`train.channels_last`: null = on GPU only, true / false = on every device / never."""
    flag = cfg.train.channels_last
    return device.type == "cuda" if flag is None else bool(flag)


class Trainer:
    """Trains `objective` (default: the pretraining method `train.method`) on every rank of the launch."""

    def __init__(self, cfg: Config, dist_info: DistInfo | None = None, objective: Objective | None = None):
        from ..methods import build_method

        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.out = Path(cfg.out_dir)
        self.objective = objective or build_method(cfg)
        s = self.settings = self.objective.loop_settings()
        t, world = cfg.train, self.dist.world_size
        batch_key = "train.batch_size" if s.stage == "pretrain" else f"{s.stage}.batch_size"
        if s.batch_size % world:
            raise ConfigError(f"{batch_key}={s.batch_size} is not divisible by the {world} ranks; choose a "
                              f"multiple of {world} (it is the global batch, split evenly over the ranks)")
        self.data = training_data(s.data, s.batch_size // world, seed=t.seed, rank=self.dist.rank,
                                  world_size=world, device=self.device, select=s.subset)
        self.loader = self.data.loader
        self.num_images = self.loader.sampler.num_samples  # the images trained on (a subset, or all)
        if self.loader.batches_per_epoch == 0:
            raise ConfigError(f"{batch_key}={s.batch_size} is larger than the {self.num_images} training images")
        self.objective.bind(DataFacts(self.data.num_samples, self.data.num_classes), self.device)
        torch.manual_seed(t.seed)
        model = self.objective.build_model().to(self.device)
        if t.sync_bn and world > 1:
            model = convert_sync_batchnorm(model, self.device)
        self.channels_last = uses_channels_last(cfg, self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(self.objective.param_groups(model), lr=s.lr, momentum=s.momentum,
                                    weight_decay=s.weight_decay)
        self.steps_per_epoch = self.loader.batches_per_epoch
        self.total_steps = s.epochs * self.steps_per_epoch
        factor = self.objective.lr_factor
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: factor(step, self.steps_per_epoch, self.total_steps))
        self.engine = build_engine(t.engine, model, optimizer, scheduler, self.dist, self.loader.batch_size,
                                   t.zero_stage)
        # Views and attacks reseed from (seed, step) every step: nothing to checkpoint, and a sample's
        # views do not depend on the number of ranks (see rng.StepRandom).
        self.random = StepRandom(self.device, t.seed, self.dist.rank, world)
        self.step = 0
        self.lr = optimizer.param_groups[0]["lr"]
        self.stopped_by_signal = False
        self.run = RunFolder(self.out, s.stage, self.dist)

    @property
    def model(self) -> torch.nn.Module:
        """The plain network (not the DDP / DeepSpeed wrapper)."""
        return self.engine.module

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(f"[{self.settings.stage}] {message}", flush=True)

    # -- checkpoint -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / self.settings.checkpoint

    def facts(self, finished: bool = False) -> dict:
        """What a checkpoint records beside the weights and optimizer state."""
        return {"step": self.step, "total_steps": self.total_steps, "epoch": self.step // self.steps_per_epoch,
                "finished": finished, "method": self.cfg.train.label or self.cfg.train.method,
                "world_size": self.dist.world_size, "engine": self.cfg.train.engine, "config": to_yaml(self.cfg),
                "objective": self.objective.state_dict(), **self.objective.checkpoint_facts(finished)}

    def _method_fact(self) -> dict:
        """run.json of a pretraining names what it trains (a finetuning's names it in its results)."""
        return {"method": self.cfg.train.label or self.cfg.train.method} if self.settings.stage == "pretrain" else {}

    def save(self, finished: bool = False) -> None:
        self.engine.save(self.checkpoint_path, self.facts(finished))

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = self.engine.load(self.checkpoint_path, check=self._refuse_other_run)
        self.step = state["step"]
        self.objective.load_state_dict(state.get("objective") or {})
        return True

    def _refuse_other_run(self, state: dict) -> None:
        """A checkpoint whose identity keys (LoopSettings.identity) differ from this config's is another run's:
        resuming it would mix two experiments (or jump the step count and lr schedule), so stop instead."""
        import yaml

        saved = yaml.safe_load(state.get("config") or "{}") or {}
        now = yaml.safe_load(to_yaml(self.cfg))

        def value(tree: dict, key: str):
            for part in key.split("."):
                tree = tree.get(part) if isinstance(tree, dict) else None
            return str(Path(tree).resolve()) if key.endswith("checkpoint") and tree else tree

        differ = [f"{k}: {value(saved, k)!r} → {value(now, k)!r}" for k in self.settings.identity
                  if value(saved, k) != value(now, k)]
        if differ:
            raise ConfigError(f"{self.checkpoint_path} belongs to another run ({'; '.join(differ)}); resuming it "
                              "with this config would mix the two. Use another out_dir, or restore those values")

    def _check_finite_weights(self) -> None:
        """The step's loss was finite before the update, but the update itself may have produced NaN/inf:
        never let such weights replace the last good checkpoint."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise NonFiniteLossError(f"the weights became non-finite at step {self.step}")

    # -- loop -------------------------------------------------------------------------------------
    def fit(self, stop_after_steps: int | None = None, on_step: Callable[[Trainer, dict], None] | None = None,
            stop: StopRequest | None = None) -> Path:
        """Train to the end (or for `stop_after_steps` steps in total); returns the run folder.

        `stop`: the launcher's request to stop at the next step boundary (SIGUSR2 before a time limit).
        """
        resumed = self.resume()
        if resumed and self.step >= self.total_steps:
            self.log(f"already finished ({self.checkpoint_path}); nothing to do")
            if not is_finished(self.out):  # killed between the last checkpoint and run.json's "finished"
                self.run.start(to_yaml(self.cfg), {"step": self.step})
                self.run.finish(True, steps_done=self.step)
            return self.out
        changed = self.run.start(to_yaml(self.cfg), {"step": self.step} if resumed else None,
                                 engine=self.cfg.train.engine, sync_bn=self.cfg.train.sync_bn,
                                 **self._method_fact())
        self.log(self._header(resumed))
        if changed:
            self.log(f"warning: resuming {self.checkpoint_path} with a changed config: {', '.join(changed)}")
        logger = MetricLogger(self.out, self.total_steps, self.step, self.settings.batch_size,
                              enabled=self.dist.is_main)
        try:
            self._loop(logger, stop_after_steps, on_step, stop)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}. Training stopped; the last good checkpoint ({self.checkpoint_path}) "
                                     "is kept. Lower the learning rate or check the data.") from None
        finally:
            logger.close()
        facts = {"steps_done": self.step}
        if self.stopped_by_signal:
            facts["stopped_by_signal"] = True
        self.run.finish(self.step >= self.total_steps, **facts)
        barrier()  # no rank returns before rank 0's last checkpoint and run.json are written
        return self.out

    def _header(self, resumed: bool) -> str:
        s, w = self.settings, self.dist.world_size
        left_out = self.num_images - self.steps_per_epoch * s.batch_size
        ranks = (f"{w} ranks × {s.batch_size // w} images ({self.cfg.train.engine}"
                 + (", SyncBN" if self.cfg.train.sync_bn else "") + ")") if w > 1 else "1 process"
        return (f"{self.objective.describe()} on {s.data.name}: {self.num_images} images "
                f"({self.data.description}), {self.steps_per_epoch} steps/epoch of {s.batch_size} on {ranks}, "
                f"{self.total_steps} steps, device {self.device}"
                + (f"; each epoch leaves out {left_out} images (the partial last batch; reshuffled every epoch)"
                   if left_out else "")
                + (f", resumed at step {self.step}" if resumed else "") + f" → {self.out}")

    def context(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> StepContext:
        engine = self.engine
        return StepContext(step=self.step, epoch=self.step // self.steps_per_epoch, total_steps=self.total_steps,
                           steps_per_epoch=self.steps_per_epoch, random=self.random.reseed(self.step),
                           model=engine.model, module=engine.module,
                           images=images.to(self.device, non_blocking=True),
                           labels=labels.to(self.device, non_blocking=True),
                           indices=indices.to(self.device, non_blocking=True))

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on a loader batch; returns its metrics as device tensors.

        Nothing here waits for the device (tests/test_engine.py checks it with `HostSyncRecorder`): the
        loader's batches are pinned, their copies non-blocking, and metrics are read only at `flush`.
        """
        # channels_last lives in the weights: convolutions then return channels_last activations.
        ctx = self.context(images, labels, indices)
        with autocast_for(self.cfg, self.device):
            out = self.objective.training_step(ctx)
        fault_point("train.mid_step")
        self.lr = self.engine.lr  # what this step trains with (logged with it)
        self.engine.update(out.loss)
        self.objective.after_optimizer_step(ctx)
        self.step += 1
        return out.metrics

    def _epoch_context(self, epoch: int) -> EpochContext:
        return EpochContext(epoch=epoch, step=self.step, total_steps=self.total_steps, module=self.engine.module,
                            dist=self.dist, log=self.log)

    def _loop(self, logger: MetricLogger, stop_after_steps, on_step, stop: StopRequest | None) -> None:
        t = self.cfg.train
        last = min(self.total_steps, stop_after_steps or self.total_steps)
        engine = self.engine
        while self.step < last:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            self.objective.train_mode(engine.module)
            if skip == 0:
                self.objective.on_epoch_start(self._epoch_context(epoch))
            self.loader.set_epoch(epoch, start_batch=skip)
            for images, labels, indices in self.loader:
                logger.update(self.train_step(images, labels, indices))
                epoch_done = self.step % self.steps_per_epoch == 0
                record = None
                if self.step % t.log_every == 0 or self.step % t.ckpt_every == 0 or self.step == last or epoch_done:
                    record = logger.flush(self.step, epoch, self.lr)
                if epoch_done:
                    # e.g. validation; before the checkpoint, so that it records the hook's result
                    self.objective.on_epoch_end(self._epoch_context(epoch + 1))
                    self.objective.train_mode(engine.module)
                saved = self.step % t.ckpt_every == 0 or self.step == last or epoch_done
                if saved:
                    self._check_finite_weights()
                    fault_point("train.before_checkpoint")
                    self.save(finished=self.step == self.total_steps)
                if on_step is not None:
                    on_step(self, record or {})
                if self.step >= last:
                    return
                if stop is not None and stop.agreed():
                    # The launcher's warning signal (time limit / preemption): keep every finished step.
                    if not saved:
                        logger.flush(self.step, epoch, self.lr)
                        self._check_finite_weights()
                        self.save()
                    self.stopped_by_signal = True
                    self.log(f"stopped at step {self.step} of {self.total_steps} on {signal_name(stop.signal)}; "
                             f"checkpoint {self.checkpoint_path} written, a rerun resumes there")
                    return


def pretrain(cfg: Config, stop: StopRequest | None = None, stop_after_steps: int | None = None) -> Path:
    """Run (or resume) pretraining as configured, on every rank the launcher started; returns the run folder."""
    with distributed_session(cfg.train.device) as dist_info, folder_lock(cfg.out_dir, dist_info):
        return Trainer(cfg, dist_info).fit(stop_after_steps, stop=stop)
