"""Step randomness: reproducible from (seed, step) alone, and a sample's views independent of the rank count."""
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
