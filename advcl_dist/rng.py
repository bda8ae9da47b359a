"""Randomness of a training step that does not depend on the number of ranks, nor on resuming.

Every step reseeds from (seed, step), so a resumed run needs no generator state and replays exactly.
Per-sample augmentation parameters are drawn for the *global* batch from a stream every rank shares,
and each rank keeps its own rows (the `rank::world` rows, matching `ShardedSampler`'s interleaving).
A sample therefore gets the same views on 1 or 64 ranks; the draws are a few scalars per sample, so
drawing them for the global batch costs nothing. Dense noise (PGD random starts) is image-sized and
would not be cheap to draw globally: it comes from a per-rank stream instead.
"""
from __future__ import annotations

import torch

_U64 = (1 << 64) - 1


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for (seed, step, stream); distinct inputs give unrelated seeds (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return (z ^ (z >> 31)) & (_U64 >> 1)  # 63 bits


class StepRandom:
    """Random draws for one rank's share of a global batch.

    `rand(shape)` gives uniform [0, 1) rows for this rank's samples (shape[0] = local batch);
    `noise` is a per-rank `torch.Generator` for dense draws such as PGD's random start.
    """

    def __init__(self, device: torch.device | str, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shared = torch.Generator(device)
        self.noise = torch.Generator(device)
        self.reseed(0)

    @property
    def device(self) -> torch.device:
        return self.shared.device

    def reseed(self, step: int) -> StepRandom:
        """Start the streams of `step` (0-based); no host sync, nothing to checkpoint."""
        self.shared.manual_seed(step_seed(self.seed, step, 0))
        self.noise.manual_seed(step_seed(self.seed, step, 1 + self.rank))
        return self

    def rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform [0, 1) of `shape`; row i is global row `rank + i·world` of the same draw on every rank."""
        rows, rest = shape[0], tuple(shape[1:])
        full = torch.rand((rows * self.world_size, *rest), generator=self.shared, device=self.device)
        return full[self.rank :: self.world_size]


def uniform(source: torch.Generator | StepRandom, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform [0, 1) per-sample draws from a plain generator (one process) or a `StepRandom`."""
    if isinstance(source, StepRandom):
        return source.rand(shape)
    return torch.rand(shape, generator=source, device=source.device)


def noise_generator(source: torch.Generator | StepRandom) -> torch.Generator:
    """The generator for dense per-rank noise."""
    return source.noise if isinstance(source, StepRandom) else source
