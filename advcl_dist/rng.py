"""Randomness of a training step that does not depend on the number of ranks, nor on resuming.

Every step reseeds from (seed, step), so a resumed run needs no generator state and replays exactly.
Per-sample augmentation parameters are drawn for the *global* batch from a stream every rank shares,
and each rank keeps its own rows (the `rank::world` rows, matching `ShardedSampler`'s interleaving).
A sample therefore gets the same views on 1 or 64 ranks; the draws are a few scalars per sample, so
drawing them for the global batch costs nothing. Dense noise (PGD random starts) is image-sized and
would not be cheap to draw globally: it comes from a per-rank stream instead, or, where a number must
not depend on how images are batched (evaluation), from one stream per image keyed by its dataset index.

`StepRandom` is the one random source of the package: views, attacks and finetuning all draw from it.
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
    `noise(shape)` dense uniform noise (PGD's random start) from the per-rank stream, or, after
    `keyed(indices)`, row i from a stream of its own seeded by (seed, indices[i]).
    """

    KEYED_STREAM = 1 << 40  # far from the per-rank streams 1 + rank

    def __init__(self, device: torch.device | str, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shared = torch.Generator(device)
        self._noise = torch.Generator(device)
        self._keys: list[int] | None = None
        self.reseed(0)

    @property
    def device(self) -> torch.device:
        return self.shared.device

    def reseed(self, step: int) -> StepRandom:
        """Start the streams of `step` (0-based); no host sync, nothing to checkpoint."""
        self.shared.manual_seed(step_seed(self.seed, step, 0))
        self._noise.manual_seed(step_seed(self.seed, step, 1 + self.rank))
        self._keys = None
        return self

    def keyed(self, indices) -> StepRandom:
        """Make `noise` draw row i from (seed, indices[i]) alone: the same for an image however the images
        are batched or sharded over ranks. `indices` are host integers (dataset indices)."""
        self._keys = [int(i) for i in indices]
        return self

    def rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform [0, 1) of `shape`; row i is global row `rank + i·world` of the same draw on every rank."""
        rows, rest = shape[0], tuple(shape[1:])
        full = torch.rand((rows * self.world_size, *rest), generator=self.shared, device=self.device)
        return full[self.rank :: self.world_size]

    def noise(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) dense noise of `shape` (per rank, or per keyed row)."""
        if self._keys is None:
            return torch.rand(shape, generator=self._noise, device=self.device, dtype=dtype)
        if len(self._keys) != shape[0]:
            raise ValueError(f"keyed noise: {len(self._keys)} keys for {shape[0]} rows")
        rows = []
        for key in self._keys:
            self._noise.manual_seed(step_seed(self.seed, key, self.KEYED_STREAM))
            rows.append(torch.rand(tuple(shape[1:]), generator=self._noise, device=self.device, dtype=dtype))
        return torch.stack(rows) if rows else torch.empty(shape, device=self.device, dtype=dtype)


def uniform(source: StepRandom, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform [0, 1) per-sample draws for this rank's rows."""
    return source.rand(shape)
