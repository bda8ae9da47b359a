"""Learning-rate schedule: linear warm-up per step, then cosine to `min_lr` (SupCon/AdvCL style)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float,
                  warmup_start_lr: float) -> float:
    """The learning rate at optimiser step `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
