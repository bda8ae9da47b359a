"""The method interface and the registry that maps `train.method` to a class."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..losses import multiview_nt_xent
from ..models import AdvCLNet, build_model
from ..rng import StepRandom

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    def wrap(cls):
        if name in METHODS:
            raise KeyError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to back-propagate
    metrics: dict[str, torch.Tensor]  # detached scalars, logged as averages (no host sync here)


class Method:
    """One pretraining objective. Subclasses define the BN branches, heads and the step."""

    name = "?"
    branches: tuple[str, ...] = ("normal",)

    def __init__(self, cfg, num_samples: int, device: torch.device, num_classes: int | None = None):
        self.cfg = cfg
        self.num_samples = num_samples
        self.device = device
        self.num_classes = num_classes

    def pseudo_ks(self) -> tuple[int, ...]:
        return ()

    def build_model(self) -> AdvCLNet:
        m = self.cfg.model
        return build_model(m.arch, m.width, self.branches, m.proj_dim, m.proj_hidden, self.pseudo_ks())

    def contrastive(self, z: torch.Tensor) -> torch.Tensor:
        """Multi-view NT-Xent on `z` [B, V, D] over the global batch, times the configured factor."""
        loss_cfg = self.cfg.loss
        scale = loss_cfg.temperature / loss_cfg.base_temperature if loss_cfg.base_temperature else 1.0
        return scale * multiview_nt_xent(z, loss_cfg.temperature, gather=True)

    def training_step(self, model: nn.Module, images: torch.Tensor, indices: torch.Tensor,
                      generator: StepRandom, attack_model: nn.Module | None = None,
                      labels: torch.Tensor | None = None) -> StepOutput:
        """`images` uint8 [B, C, H, W] on the device; `model` may be wrapped (DDP), `attack_model` not.

        Draw every random number from `generator` (reseeded each step), so that views do not depend
        on the number of ranks and a resumed run replays exactly.

        `labels` are the dataset's labels; only supervised methods may use them.
        """
        raise NotImplementedError


def build_method(cfg, num_samples: int, device: torch.device, num_classes: int | None = None) -> Method:
    if cfg.train.method not in METHODS:
        raise KeyError(f"train.method={cfg.train.method!r} is not one of {sorted(METHODS)}")
    return METHODS[cfg.train.method](cfg, num_samples, device, num_classes)


def split_views(t: torch.Tensor, views: int) -> torch.Tensor:
    """[V·B, D] rows in view-major order → [B, V, D]."""
    return t.reshape(views, -1, t.shape[-1]).transpose(0, 1)
