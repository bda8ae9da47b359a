"""Attacks in evaluation against the analytic worst case of a linear classifier on digits."""
import pytest
import torch
from torch import nn

from advcl_dist.data import get_dataset
from advcl_dist.distributed import DistInfo
from advcl_dist.eval_blocks import blocks, rank_share, sharded_flags
from advcl_dist.evaluate import autoattack_flags, pgd_block

EPS = 32 / 255  # digits (4×4 blocks of 17 grey levels) shrug off 8/255 even for a linear model


@pytest.fixture(scope="module")
def linear_model():
    """Multinomial logistic regression on raw digit pixels: accurate and, like any linear model, not robust."""
    torch.manual_seed(0)
    train = get_dataset("digits", "train")
    x = train.images.float() / 255
    y = train.labels
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


ONE_PROCESS = DistInfo(0, 1, 0, torch.device("cpu"))


def correct_flags(model, dataset, eps, step_size, steps, batch_size, indices=None):
    """Per-image clean and PGD-`steps` correctness flags (bool) of `dataset` through the sharded evaluator."""
    indices = range(len(dataset)) if indices is None else indices
    flags = sharded_flags("pgd", pgd_block(model, eps, step_size, steps, seed=0), 2, dataset, indices, batch_size,
                          32, ONE_PROCESS)
    return torch.from_numpy(flags[0]).bool(), torch.from_numpy(flags[1]).bool()


def analytic_bounds(model, x, y, eps):
    """Per-image (certified robust, survives the analytic attack) for a linear model in the L∞ ball.

    Class y beats j for every δ with |δ|∞ ≤ ε iff margin_j − ε‖w_y − w_j‖₁ > 0 (the box [0, 1]
    only removes perturbations, so this certifies). The attack x − ε·sign(w_y − w_j), clamped,
    is the optimal one-target step; an image survives it if every target fails.
    """
    w, b = model[1].weight.double(), model[1].bias.double()
    flat = x.flatten(1).double()
    logits = flat @ w.T + b
    certified, survives = [], []
    for i in range(len(x)):
        diff = w[y[i]] - w  # [classes, D]
        margin = logits[i, y[i]] - logits[i]
        others = torch.arange(len(w)) != y[i]
        certified.append(bool((margin - eps * diff.abs().sum(1))[others].min() > 0))
        attacked = (flat[i] - eps * diff.sign()).clamp(0, 1)  # one candidate per target j
        preds = (attacked @ w.T + b).argmax(1)
        survives.append(bool((preds[others] == y[i]).all()))
    return torch.tensor(certified), torch.tensor(survives)


def test_pgd20_drives_a_linear_models_accuracy_to_its_analytic_robust_accuracy(linear_model):
    test = get_dataset("digits", "test")
    clean, robust = correct_flags(linear_model, test, EPS, EPS / 4, 20, 128)
    x, y = test.images.float() / 255, test.labels
    certified, survives = analytic_bounds(linear_model, x, y, EPS)
    sa, ra = clean.float().mean() * 100, robust.float().mean() * 100
    assert sa > 90
    assert ra < sa - 30, (sa, ra)  # the attack bites
    assert (robust <= clean).all()  # PGD never turns a wrong prediction right
    assert not (certified & ~robust).any()  # nothing certified robust is reported broken
    assert ra <= survives.float().mean() * 100 + 1.0  # at least as strong as the best one-target step


def test_autoattack_runs_end_to_end_and_is_at_least_as_strong_as_pgd(linear_model):
    test = get_dataset("digits", "test")
    x, y = test.images[:40].float() / 255, test.labels[:40]
    aa = autoattack_flags(linear_model, x, y, EPS, batch_size=40, seed=0)
    _, robust = correct_flags(linear_model, test, EPS, EPS / 4, 20, 40, indices=range(40))
    certified, _ = analytic_bounds(linear_model, x, y, EPS)
    with torch.no_grad():
        clean = linear_model(x).argmax(1) == y
    assert aa.shape == (40,) and aa.dtype == torch.bool
    assert (aa <= clean).all()
    assert not (certified & ~aa).any()
    assert aa.sum() <= robust.sum()
    assert aa.float().mean() < clean.float().mean() - 0.3


def test_blocks_cover_the_images_once_and_ranks_take_contiguous_runs_of_them():
    cut = blocks(360, 50)
    assert cut[0] == (0, 50) and cut[-1] == (350, 360) and len(cut) == 8
    for world in (1, 2, 3, 5, 9):
        shares = [rank_share(cut, rank, world) for rank in range(world)]
        assert [b for share in shares for b in share] == cut  # in order, each block once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_pgd_random_start_of_an_image_does_not_depend_on_its_block(linear_model):
    """Blocks of 7 or of 40 (other batch compositions): the same per-image flags."""
    test = get_dataset("digits", "test")
    in_sevens = correct_flags(linear_model, test, EPS, EPS / 4, 2, 7, indices=range(40))
    in_one = correct_flags(linear_model, test, EPS, EPS / 4, 2, 40, indices=range(40))
    assert all(torch.equal(a, b) for a, b in zip(in_sevens, in_one))
