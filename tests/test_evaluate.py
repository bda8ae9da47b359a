"""Attacks in evaluation against the analytic worst case of a linear classifier on digits."""
import pytest
import torch
from torch import nn

from advcl_dist.data import get_dataset
from advcl_dist.evaluate import autoattack_flags, correct_flags

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
    clean, robust, _, _ = correct_flags(linear_model, test, EPS, EPS / 4, 20, 128, 32, seed=0)
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
    _, robust, _, _ = correct_flags(linear_model, torch.utils.data.Subset(test, range(40)), EPS, EPS / 4, 20, 40, 32,
                                    seed=0)
    certified, _ = analytic_bounds(linear_model, x, y, EPS)
    with torch.no_grad():
        clean = linear_model(x).argmax(1) == y
    assert aa.shape == (40,) and aa.dtype == torch.bool
    assert (aa <= clean).all()
    assert not (certified & ~aa).any()
    assert aa.sum() <= robust.sum()
    assert aa.float().mean() < clean.float().mean() - 0.3
