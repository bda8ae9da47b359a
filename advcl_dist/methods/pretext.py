"""Self-supervised pretext transforms with their labels: rotation and jigsaw (AP-DPE, Chen et al. CVPR 2020).

Pure, batched and on the batch's device. The per-image choice (which rotation, which permutation) is
drawn from the step's `StepRandom` (`rand`: one global draw that every rank slices, so a sample gets the
same label on 1 or N ranks and on resume); the transforms themselves are deterministic.

- Rotation (Gidaris et al. 2018, as in the authors' `rotation()` of pretraining/train_adv_rotation.py):
  4 classes, image i turned by k_i·90° as `torch.rot90(x_i, k_i, dims=(1, 2))`.
- Jigsaw (Noroozi & Favaro 2016, as in the authors' `jigsaw()` of pretraining/train_adv_jigsaw.py): the
  image cut into a grid × grid of patches (8×8-pixel patches, 4 × 4 on 32×32 CIFAR), reordered by one of
  a fixed set of permutations; class 0 is the unshuffled image, classes 1..P the P permutations (the
  authors: P = 30, `--class_number 31`).
"""
from __future__ import annotations

import math

import torch

from ..rng import StepRandom

ROTATIONS = 4  # 0°, 90°, 180°, 270°


def rotation_labels(random: StepRandom, batch: int) -> torch.Tensor:
    """k_i uniform in {0, 1, 2, 3}, one per image (int64 [batch]).

    The authors draw a balanced permutation of [0, 1, 2, 3]·⌈B/4⌉ per batch: the same marginal law; a per-image
    draw keeps each sample's label independent of how the global batch is split over ranks.
    """
    return (random.rand((batch,)) * ROTATIONS).long().clamp_(max=ROTATIONS - 1)


def rotate(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, H] with image i turned by turns[i]·90° counter-clockwise in the (H, W) plane."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate: images must be square, got {tuple(x.shape[-2:])}")
    every = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])  # [4, B, C, H, W]
    return every[turns, torch.arange(x.shape[0], device=x.device)]


def jigsaw_permutations(count: int, grid: int, seed: int) -> torch.Tensor:
    """The fixed permutation set, int64 [count + 1, grid²]: row 0 the identity (class 0), rows 1..count
    distinct non-identity permutations drawn with torch.randperm from a CPU generator seeded with `seed`.

    The authors draw 30 uniformly random permutations of the 16 patches once per run (numpy's global RNG,
    saved as permutation.npy, not published in the repository); random draws, not a maximal-Hamming
    selection, are theirs. Seeded here so that the set, and with it the meaning of the jigsaw head's
    classes, is the same for every rank and every resume.
    """
    n = grid * grid
    if count < 1 or count > math.factorial(n) - 1:
        raise ValueError(f"jigsaw_permutations: {count} permutations asked, a {grid}×{grid} grid has "
                         f"{math.factorial(n) - 1} besides the identity")
    generator = torch.Generator().manual_seed(seed)
    rows = [tuple(range(n))]
    seen = set(rows)
    while len(rows) < count + 1:
        candidate = tuple(torch.randperm(n, generator=generator).tolist())
        if candidate not in seen:
            seen.add(candidate)
            rows.append(candidate)
    return torch.tensor(rows, dtype=torch.int64)


def jigsaw_labels(random: StepRandom, batch: int, classes: int, identity_p: float) -> torch.Tensor:
    """One class per image in [0, classes): 0 (unshuffled) with probability identity_p, else uniform over all
    classes (0 included), as the authors' `jigsaw(input, permutation, bias=0.9)`: order ~ U{0..P}, then
    order = 0 when rand > bias."""
    u = random.rand((batch, 2))
    uniform_class = (u[:, 1] * classes).long().clamp_(max=classes - 1)
    return torch.where(u[:, 0] < identity_p, torch.zeros_like(uniform_class), uniform_class)


def jigsaw(x: torch.Tensor, permutations: torch.Tensor, labels: torch.Tensor, grid: int) -> torch.Tensor:
    """x [B, C, H, W] cut into grid × grid patches numbered row-major (p = row·grid + col); in image i the
    patch at position p is the input's patch permutations[labels[i], p]."""
    b, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"jigsaw: a {h}×{w} image does not cut into a {grid}×{grid} grid of equal patches")
    ph, pw, n = h // grid, w // grid, grid * grid
    patches = x.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, ph, pw)
    order = permutations.to(x.device)[labels]  # [B, n]: source patch of each position
    moved = torch.gather(patches, 1, order[:, :, None, None, None].expand(b, n, c, ph, pw))
    return moved.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


__all__ = ["ROTATIONS", "jigsaw", "jigsaw_labels", "jigsaw_permutations", "rotate", "rotation_labels"]
