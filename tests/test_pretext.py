"""Pretext transforms (methods/pretext.py) against explicit per-image, per-pixel and per-patch loops."""
import math

import pytest
import torch

from advcl_dist.methods.pretext import jigsaw, jigsaw_labels, jigsaw_permutations, rotate, rotation_labels
from advcl_dist.rng import StepRandom


def turned_by_hand(image: torch.Tensor, k: int) -> torch.Tensor:
    """[C, n, n] turned k·90° counter-clockwise, pixel by pixel (the layout torch.rot90(·, k, (1, 2)) gives)."""
    n = image.shape[-1]
    out = torch.empty_like(image)
    for i in range(n):
        for j in range(n):
            source = {0: (i, j), 1: (j, n - 1 - i), 2: (n - 1 - i, n - 1 - j), 3: (n - 1 - j, i)}[k]
            out[:, i, j] = image[:, source[0], source[1]]
    return out


def test_rotate_equals_rot90_of_each_image_and_the_pixel_formula():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 5, 5, dtype=torch.float64)
    turns = torch.tensor([0, 1, 2, 3, 1, 3])
    out = rotate(x, turns)
    for i in range(6):
        assert torch.equal(out[i], torch.rot90(x[i], int(turns[i]), dims=(1, 2)))
        assert torch.equal(out[i], turned_by_hand(x[i], int(turns[i])))
    with pytest.raises(ValueError, match="square"):
        rotate(torch.rand(2, 3, 4, 6), torch.tensor([0, 1]))


def test_rotation_labels_are_uniform_reproducible_and_the_same_on_every_rank_split():
    labels = rotation_labels(StepRandom("cpu", 3).reseed(5), 4000)
    assert labels.dtype == torch.int64 and labels.min() == 0 and labels.max() == 3
    shares = torch.bincount(labels, minlength=4).double() / 4000
    assert torch.all((shares - 0.25).abs() < 0.03), shares
    assert torch.equal(labels, rotation_labels(StepRandom("cpu", 3).reseed(5), 4000))
    for rank in range(2):  # rank r of 2 gets the rows r::2 of the single-process draw
        assert torch.equal(rotation_labels(StepRandom("cpu", 3, rank, 2).reseed(5), 2000), labels[rank::2])


def test_permutation_set_is_fixed_by_its_seed_with_the_identity_first_and_no_repeats():
    perms = jigsaw_permutations(30, 4, seed=0)
    assert perms.shape == (31, 16) and perms.dtype == torch.int64
    assert torch.equal(perms[0], torch.arange(16))
    assert all(sorted(row.tolist()) == list(range(16)) for row in perms)  # each row a permutation
    assert len({tuple(row.tolist()) for row in perms}) == 31  # distinct, so no second identity
    assert torch.equal(perms, jigsaw_permutations(30, 4, seed=0))
    assert not torch.equal(perms, jigsaw_permutations(30, 4, seed=1))
    every = jigsaw_permutations(23, 2, seed=0)  # a 2×2 grid: all 4! orders
    assert len({tuple(row.tolist()) for row in every}) == math.factorial(4)
    with pytest.raises(ValueError, match="besides the identity"):
        jigsaw_permutations(24, 2, seed=0)


@pytest.mark.parametrize("size", [(32, 32), (16, 32)])
def test_jigsaw_puts_each_patch_where_its_permutation_says(size):
    torch.manual_seed(0)
    h, w = size
    grid, perms = 4, jigsaw_permutations(30, 4, seed=0)
    x = torch.rand(5, 3, h, w, dtype=torch.float64)
    labels = torch.tensor([0, 1, 30, 7, 0])
    out = jigsaw(x, perms, labels, grid)
    ph, pw = h // grid, w // grid
    for i in range(5):
        for position in range(grid * grid):
            row, col = divmod(position, grid)
            src_row, src_col = divmod(int(perms[labels[i], position]), grid)
            placed = out[i, :, row * ph:(row + 1) * ph, col * pw:(col + 1) * pw]
            assert torch.equal(placed, x[i, :, src_row * ph:(src_row + 1) * ph, src_col * pw:(src_col + 1) * pw])
    assert torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1])  # class 0 is the unshuffled image
    with pytest.raises(ValueError, match="grid"):
        jigsaw(torch.rand(2, 3, 30, 30), perms, labels[:2], grid)


def test_jigsaw_labels_force_the_identity_with_its_probability_and_split_over_ranks():
    draw = lambda p, rank=0, world=1: jigsaw_labels(StepRandom("cpu", 9, rank, world).reseed(2), 20000, 31, p)  # noqa: E731
    assert torch.all(draw(1.0) == 0)
    uniform = draw(0.0)
    assert uniform.min() == 0 and uniform.max() == 30
    assert abs((uniform == 0).double().mean() - 1 / 31) < 0.01
    labels = draw(0.1)
    # the authors' law: class 0 with probability 0.1 + 0.9/31, every other class 0.9/31
    assert abs((labels == 0).double().mean() - (0.1 + 0.9 / 31)) < 0.015
    assert abs((labels == 17).double().mean() - 0.9 / 31) < 0.01
    for rank in range(2):
        assert torch.equal(jigsaw_labels(StepRandom("cpu", 9, rank, 2).reseed(2), 10000, 31, 0.1), labels[rank::2])
