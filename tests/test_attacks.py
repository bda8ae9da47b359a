import torch
import torch.nn.functional as F

from advcl_dist.attacks import pgd, ramp
from advcl_dist.rng import StepRandom


def linear_classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))


def test_pgd_stays_in_the_ball_and_the_image_range_and_raises_the_loss():
    model = linear_classifier()
    x = torch.rand(16, 3, 8, 8)
    x[:, :, :2] = 0.0  # pixels at the edges of [0, 1] must stay inside
    x[:, :, -2:] = 1.0
    y = torch.randint(0, 4, (16,))

    def objective(xa):
        return F.cross_entropy(model(xa), y)

    eps = 8 / 255
    res = pgd(objective, x, eps=eps, step_size=2 / 255, steps=10, generator=StepRandom("cpu", 0))
    assert (res.x_adv - x).abs().max() <= eps + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert objective(res.x_adv) > objective(x) + 0.05
    assert res.last_loss > res.initial_loss


def test_pgd_matches_an_independent_sign_gradient_loop_for_a_linear_objective():
    """For a linear objective the gradient sign is constant, so PGD walks to the ball's corner."""
    w = torch.randn(2, 3, 4, 4)
    x = torch.full((2, 3, 4, 4), 0.5)
    res = pgd(lambda xa: (xa * w).sum(), x, eps=0.1, step_size=0.03, steps=5, random_start=False)
    assert torch.allclose(res.x_adv, x + 0.1 * w.sign(), atol=1e-6)


def test_pgd_leaves_parameter_gradients_untouched():
    model = linear_classifier()
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 4, (4,))
    pgd(lambda xa: F.cross_entropy(model(xa), y), x, 8 / 255, 2 / 255, 3)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_perturbation_is_float32_under_autocast():
    model = linear_classifier()
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 4, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = pgd(lambda xa: F.cross_entropy(model(xa), y), x, 8 / 255, 2 / 255, 3)
    assert res.x_adv.dtype == torch.float32
    assert (res.x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_pgd_is_reproducible_with_a_step_random():
    model = linear_classifier()
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 4, (4,))

    def run(seed):
        return pgd(lambda xa: F.cross_entropy(model(xa), y), x, 8 / 255, 2 / 255, 2,
                   generator=StepRandom("cpu", seed)).x_adv

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_ramp_grows_linearly_to_one_over_its_epochs():
    assert ramp(0, 11, 0) == ramp(500, 11, 0) == 1.0  # no ramp: the paper's constant ε
    assert [ramp(s, 10, 2) for s in (0, 4, 9, 18, 19, 20, 400)] == [1 / 20, 5 / 20, 10 / 20, 19 / 20, 1, 1, 1]
    assert ramp(2, 4, 0.5) == 1.0  # a ramp shorter than an epoch
