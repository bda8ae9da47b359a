"""How a training step updates the weights and how that state is checkpointed: torch or DeepSpeed.

Both expose the same small surface to the loop: `model` (what the training forward calls: the
DDP or DeepSpeed wrapper), `module` (the plain network, used by the attacks so their extra
forwards/backwards never touch gradient synchronisation), `update(loss)`, `lr`, `save` and `load`.
`checkpoint.pt` always holds the plain weights plus the run's facts (step, config, ...), which
is what finetuning and clustering read.
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config_schema import ConfigError
from ..distributed import DistInfo, barrier
from .checkpoint import check_deepspeed_shards, load_checkpoint, load_weights, save_checkpoint


class TorchEngine:
    """One process, or DDP over the process group: one all-reduce of the gradients per step."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, dist_info: DistInfo):
        self.module, self.optimizer, self.scheduler, self.dist = module, optimizer, scheduler, dist_info
        self.model = module
        if dist_info.world_size > 1:
            device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=device_ids)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def save(self, path: Path, facts: dict) -> None:
        """Rank 0 writes weights, optimizer and scheduler (identical on every rank) with `facts`, atomically."""
        if self.dist.is_main:
            save_checkpoint({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                             "scheduler": self.scheduler.state_dict(), **facts}, path)

    def load(self, path: Path, check=None) -> dict:
        """Restore from `path`; `check(state)` runs first (e.g. refusing another run's checkpoint)."""
        state = load_checkpoint(path, self.dist.device)
        if check is not None:
            check(state)
        if "optimizer" not in state:
            raise ConfigError(f"{path} was written by train.engine={state.get('engine')}; resume it with that "
                               "engine or start a new out_dir")
        load_weights(self.module, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state


def deepspeed_config(local_batch: int, world_size: int, zero_stage: int) -> dict:
    """DeepSpeed settings for our loop: fp32 master weights (bf16 comes from autocast, as with DDP), ZeRO 0-2."""
    return {
        "train_batch_size": local_batch * world_size,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        # Our SGD (momentum, weight decay) is elementwise, so ZeRO's flat partitions handle it exactly;
        # DeepSpeed only lists Adam-like optimisers as tested.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def import_deepspeed(device: torch.device):
    """DeepSpeed, set up for `device`; on CPU its accelerator is the CPU one (gloo)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("train.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from e
    if device.type == "cpu":
        # Its CPU backend JIT-compiles a shared-memory all-reduce kernel when it starts (a C++ compiler
        # and ~70 s on first use) that serves only inference all-reduce, never training; skip it.
        comm = importlib.import_module("deepspeed.comm.torch")
        if hasattr(comm, "build_shm_op"):
            comm.build_shm_op = lambda: None
    return deepspeed


class DeepSpeedEngine:
    """DeepSpeed around the same model, optimizer and schedule; its checkpoint folder holds the ZeRO state.

    Saving is collective: every rank writes its shard under `deepspeed/step<N>`, then rank 0 writes
    `checkpoint.pt` (plain weights + facts + the tag) atomically, then older tags are removed — so a
    crash at any point leaves a `checkpoint.pt` whose tag exists.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, dist_info: DistInfo,
                 local_batch: int, zero_stage: int):
        if not torch.distributed.is_initialized():
            raise ConfigError("train.engine=deepspeed runs under a launch of several ranks (torchrun, srun); on one "
                              "process use train.engine=ddp (the same training, without DeepSpeed)")
        deepspeed = import_deepspeed(dist_info.device)
        self.dist, self.zero_stage = dist_info, zero_stage
        config = deepspeed_config(local_batch, dist_info.world_size, zero_stage)
        level = deepspeed.utils.logger.level
        deepspeed.utils.logger.setLevel(logging.ERROR)  # "untested optimizer": see deepspeed_config
        try:
            self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False)
        finally:
            deepspeed.utils.logger.setLevel(level)
        self.module = self.model.module

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def update(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # also zeroes the gradients and steps the scheduler

    def save(self, path: Path, facts: dict) -> None:
        folder, tag = path.parent / "deepspeed", f"step{facts['step']}"
        self.model.save_checkpoint(str(folder), tag=tag)
        barrier()
        if self.dist.is_main:
            save_checkpoint({"model": self.module.state_dict(), "deepspeed_tag": tag, **facts}, path)
            for old in folder.iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load(self, path: Path, check=None) -> dict:
        state = load_checkpoint(path, "cpu")
        if check is not None:
            check(state)
        tag = state.get("deepspeed_tag")
        if tag is None:
            raise ConfigError(f"{path} was written by train.engine=ddp; resume it with that engine "
                               "or start a new out_dir")
        if self.zero_stage > 0 and state.get("world_size") != self.dist.world_size:
            raise ConfigError(f"{path}: ZeRO-{self.zero_stage} state was sharded over {state.get('world_size')} "
                               f"ranks and cannot be resumed on {self.dist.world_size}; use that many ranks")
        load_weights(self.module, state["model"], path)  # the same check, and a clear error, before DeepSpeed's
        check_deepspeed_shards(path.parent / "deepspeed" / tag)
        loaded, _ = self.model.load_checkpoint(str(path.parent / "deepspeed"), tag=tag)
        if loaded is None:
            raise ConfigError(f"DeepSpeed checkpoint {path.parent / 'deepspeed' / tag} is missing; "
                               f"move {path} away to start afresh")
        return state


def build_engine(name: str, module: nn.Module, optimizer, scheduler, dist_info: DistInfo, local_batch: int,
                 zero_stage: int = 0) -> TorchEngine | DeepSpeedEngine:
    if name == "deepspeed":
        return DeepSpeedEngine(module, optimizer, scheduler, dist_info, local_batch, zero_stage)
    return TorchEngine(module, optimizer, scheduler, dist_info)
