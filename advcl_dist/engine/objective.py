"""What the shared training loop trains: a pretraining method or a finetuning mode.

The loop (engine/trainer.py) owns the data order, the step's random source, the optimiser and its
engine (DDP / DeepSpeed), autocast, checkpoints, logging and graceful stops. An `Objective` owns the
network, the loss of one step and, where it needs them, hooks around steps and epochs. Everything a
step may use arrives in one `StepContext`; nothing is set on modules behind the caller's back.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import DataConfig
from ..distributed import DistInfo
from ..rng import StepRandom


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know of an objective before it reads any data."""

    stage: str  # "pretrain" | "finetune": log prefix and run.json's stage
    data: DataConfig  # the training data (torchvision dataset or .beton)
    batch_size: int  # global: split evenly over the ranks
    epochs: int
    checkpoint: str  # file name in out_dir
    lr: float  # base lr of the first parameter group (others set theirs in param_groups)
    momentum: float
    weight_decay: float
    # dataset size → the dataset indices to train on (None: all), e.g. all but a held-out validation split
    subset: Callable[[int], Sequence[int] | None] | None = None
    # Config keys a resume must not change: they define what the checkpoint is (its network, its data, the
    # meaning of its step count). Other changes are allowed and recorded in run.json.
    identity: tuple[str, ...] = ("train.method", "train.batch_size", "model.arch", "model.width", "model.proj_dim",
                                 "model.proj_hidden", "data.name", "data.split", "data.image_size")


@dataclass(frozen=True)
class DataFacts:
    num_samples: int  # dataset size (pseudo-labels and indices refer to it)
    num_classes: int


@dataclass
class StepContext:
    """Everything one training step may use."""

    step: int  # 0-based index of this optimisation step
    epoch: int
    total_steps: int
    steps_per_epoch: int
    random: StepRandom  # reseeded from (seed, step): views and attack starts replay exactly on resume
    model: nn.Module  # the training forward: the DDP / DeepSpeed wrapper on several ranks
    module: nn.Module  # the plain network, for attacks and eval-mode forwards (outside DDP's hooks)
    images: torch.Tensor  # uint8 [B, C, H, W] on the device (this rank's share of the global batch)
    labels: torch.Tensor  # dataset labels [B] (-1 for unlabelled images)
    indices: torch.Tensor  # dataset indices [B]

    @classmethod
    def of_batch(cls, model: nn.Module, images: torch.Tensor, indices: torch.Tensor, random: StepRandom,
                 labels: torch.Tensor | None = None, module: nn.Module | None = None, step: int = 0) -> StepContext:
        """A context for one batch outside the loop (tests, benchmarks): one step of one epoch."""
        if labels is None:
            labels = torch.full_like(indices, -1)
        return cls(step=step, epoch=0, total_steps=step + 1, steps_per_epoch=step + 1, random=random, model=model,
                   module=module or model, images=images, labels=labels, indices=indices)


@dataclass
class EpochContext:
    """What epoch hooks see; hooks that use collectives run on every rank."""

    epoch: int  # the epoch about to start (on_epoch_start) or just finished, 1-based count (on_epoch_end)
    step: int
    total_steps: int
    module: nn.Module
    dist: DistInfo
    log: object = field(default=print)  # prints on rank 0 only


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to back-propagate
    metrics: dict[str, torch.Tensor]  # detached scalars, logged as averages (no host sync here)


class Objective:
    """Base of pretraining methods and finetuning modes; override what applies."""

    name = "?"

    def loop_settings(self) -> LoopSettings:
        raise NotImplementedError

    def bind(self, facts: DataFacts, device: torch.device) -> None:
        """Called once the training data is known, before `build_model` (e.g. to load per-sample targets)."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Parameter groups of the optimiser; a group may set its own lr / weight_decay."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def lr_factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """Multiplier of every group's base lr at optimisation step `step` (0-based)."""
        return 1.0

    def train_mode(self, model: nn.Module) -> None:
        """Put the plain network in training mode (e.g. keep a frozen encoder in eval mode)."""
        model.train()

    def training_step(self, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def on_epoch_start(self, ctx: EpochContext) -> None:
        pass

    def after_optimizer_step(self, ctx: StepContext) -> None:
        pass

    def on_epoch_end(self, ctx: EpochContext) -> None:
        pass

    def state_dict(self) -> dict:
        """State of the objective itself saved with every checkpoint (e.g. the best epoch so far)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def checkpoint_facts(self, finished: bool) -> dict:
        """Extra top-level entries of the checkpoint file (e.g. what later stages need to rebuild the model)."""
        return {}

    def describe(self) -> str:
        return self.name
