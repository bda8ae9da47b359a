"""Step randomness: reproducible from (seed, step) alone, and a sample's views independent of the rank count;
keyed noise: an image's random start independent of how images are batched."""
import pytest
import torch

from advcl_dist.attacks import pgd
from advcl_dist.data.augment import crop_flip_view, simclr_view
from advcl_dist.rng import StepRandom, step_seed


def images(n=12, seed=0):
    return torch.randint(0, 256, (n, 3, 20, 20), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_views_of_a_sample_do_not_depend_on_how_many_ranks_share_the_batch():
    """Rank r of W holds the global rows r, r+W, ... (ShardedSampler's interleaving) and gets their views."""
    batch = images()
    whole = StepRandom("cpu", seed=3).reseed(7)
    expected_simclr, expected_crop = simclr_view(batch, whole, size=16), crop_flip_view(batch, whole, size=16)
    for world in (2, 3, 4):
        for rank in range(world):
            mine = StepRandom("cpu", seed=3, rank=rank, world_size=world).reseed(7)
            rows = batch[rank::world]
            assert torch.equal(simclr_view(rows, mine, size=16), expected_simclr[rank::world])
            assert torch.equal(crop_flip_view(rows, mine, size=16), expected_crop[rank::world])


def test_a_step_replays_from_seed_and_step_alone():
    batch = images()
    first = StepRandom("cpu", seed=1)
    views = [simclr_view(batch, first.reseed(step), size=16) for step in range(3)]
    again = StepRandom("cpu", seed=1).reseed(2)  # a resumed run: no state but the step
    assert torch.equal(simclr_view(batch, again, size=16), views[2])
    assert not torch.equal(views[0], views[1])
    assert not torch.equal(simclr_view(batch, StepRandom("cpu", seed=2).reseed(2), size=16), views[2])


def test_pgd_random_starts_come_from_a_per_rank_stream():
    x = torch.full((4, 3, 8, 8), 0.5)
    starts = [pgd(lambda z: z.sum(), x, 0.1, 0.0, 1, True, StepRandom("cpu", 0, rank, 2).reseed(5)).x_adv
              for rank in (0, 1)]
    assert not torch.equal(starts[0], starts[1])
    again = pgd(lambda z: z.sum(), x, 0.1, 0.0, 1, True, StepRandom("cpu", 0, 1, 2).reseed(5)).x_adv
    assert torch.equal(again, starts[1])


def test_step_seeds_are_distinct_and_in_range():
    seeds = {step_seed(seed, step, stream) for seed in range(3) for step in range(200) for stream in range(4)}
    assert len(seeds) == 3 * 200 * 4 and all(0 <= s < 2**63 for s in seeds)


# --- keyed noise: one stream per image, seeded by (seed, dataset index) -----------------------------------

SHAPE = (3, 8, 8)


def alone(index, seed=4, dtype=torch.float32):
    """The noise of image `index` drawn in a batch of one."""
    return StepRandom("cpu", seed).keyed([index]).noise((1, *SHAPE), dtype)[0]


def test_keyed_noise_of_an_image_does_not_depend_on_its_batch():
    indices = [17, 3, 250, 42, 9]
    expected = torch.stack([alone(i) for i in indices])
    random = StepRandom("cpu", 4)
    assert torch.equal(random.keyed(indices).noise((5, *SHAPE)), expected)
    order = [2, 4, 0, 3, 1]  # another order
    assert torch.equal(random.keyed([indices[i] for i in order]).noise((5, *SHAPE)), expected[order])
    assert torch.equal(random.keyed([1000, 250]).noise((2, *SHAPE))[1], expected[2])  # among other images
    assert torch.equal(random.keyed(indices).noise((5, *SHAPE)), expected)  # drawing again: the same rows
    # On another rank, at another step, after other draws: keyed by (seed, index) alone.
    other = StepRandom("cpu", 4, rank=1, world_size=2).reseed(11)
    other.noise((3, *SHAPE))
    other.rand((4,))
    assert torch.equal(other.keyed(indices[::-1]).noise((5, *SHAPE)), expected.flip(0))
    # Other dtypes too.
    double = StepRandom("cpu", 4).keyed(indices).noise((5, *SHAPE), torch.float64)
    assert double.dtype == torch.float64
    assert torch.equal(double, torch.stack([alone(i, dtype=torch.float64) for i in indices]))


def test_keyed_noise_differs_between_images_and_seeds():
    rows = StepRandom("cpu", 4).keyed(range(8)).noise((8, *SHAPE)).flatten(1)
    assert not (rows[:, None] == rows[None]).all(-1).fill_diagonal_(False).any()
    assert not torch.equal(alone(3, seed=4), alone(3, seed=5))
    # The keyed streams are not the per-rank ones.
    assert not torch.equal(alone(0), StepRandom("cpu", 4).noise((1, *SHAPE))[0])


def test_keyed_noise_needs_one_key_per_row():
    with pytest.raises(ValueError, match="keyed noise"):
        StepRandom("cpu", 4).keyed([1, 2, 3]).noise((2, *SHAPE))


def test_keyed_changes_the_noise_only_and_reseed_returns_to_the_per_rank_stream():
    shape = (4, *SHAPE)
    fresh = StepRandom("cpu", 4, rank=1, world_size=2).reseed(3)
    expected_noise, expected_rand = fresh.noise(shape), fresh.rand((4, 2))
    random = StepRandom("cpu", 4, rank=1, world_size=2).reseed(3).keyed([0, 1, 2, 3])
    keyed = random.noise(shape)
    assert not torch.equal(keyed, expected_noise)
    random.reseed(3)
    assert torch.equal(random.noise(shape), expected_noise)  # unkeyed again: any number of rows
    assert torch.equal(random.rand((4, 2)), expected_rand)  # the shared (views) stream is untouched by keyed
    assert StepRandom("cpu", 4).keyed([0]).reseed(0).noise((3, *SHAPE)).shape == (3, *SHAPE)
    # the per-rank stream: another rank draws other noise
    assert not torch.equal(StepRandom("cpu", 4, rank=0, world_size=2).reseed(3).noise(shape), expected_noise)


def test_pgd_random_start_of_a_keyed_image_does_not_depend_on_how_the_batch_is_split():
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1))
    indices = [5, 61, 2, 40, 33, 7]
    eps = 0.1

    def starts(random, rows):  # no steps: x_adv is the random start
        return pgd(lambda z: z.sum(), x[rows], eps, 2 / 255, 0, True,
                   random.keyed([indices[i] for i in rows])).x_adv

    whole = starts(StepRandom("cpu", 8).reseed(3), list(range(6)))
    assert not torch.equal(whole, x) and (whole - x).abs().max() <= eps + 1e-6
    random = StepRandom("cpu", 8).reseed(3)
    assert torch.equal(torch.cat([starts(random, [0, 1]), starts(random, [2, 3, 4, 5])]), whole)
    assert torch.equal(torch.cat([starts(random, [2, 3, 4, 5]), starts(random, [0, 1])]),
                       whole[[2, 3, 4, 5, 0, 1]])  # the other order
    # the two parts on two ranks
    assert torch.equal(starts(StepRandom("cpu", 8, 1, 2).reseed(3), [2, 3, 4, 5]), whole[2:])
    assert torch.equal(starts(StepRandom("cpu", 8, 0, 2).reseed(3), [0, 1]), whole[:2])
