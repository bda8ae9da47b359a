"""Training engine: loop, schedule, checkpointing, logging, provenance."""
from .trainer import CHECKPOINT, Trainer, pretrain

__all__ = ["CHECKPOINT", "Trainer", "pretrain"]
