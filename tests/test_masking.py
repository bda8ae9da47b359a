"""Gradient-masking checks against a model whose worst case is known, and against a deliberately masked one.

The reference: a two-class linear model on 3×8×8 images x_i = 0.5 + s_i c_i sign(w). Its logit gap is
s_i c_i ||w||_1, so the smallest L∞ perturbation that flips image i is exactly c_i (Carlini et al.'s
"analytic worst case"): RA(ε) = #{c_i > ε} / n, which PGD with step ε/2 reaches in any number of steps ≥ 4.
Masked: the same model with its logits × 10⁴. The decision boundary is the same, but float32 softmax
saturates, cross-entropy's gradient is exactly 0 and PGD can only use its random start: a model that
looks robust and is not.
"""
import numpy as np
import pytest
import torch

from advcl_dist.masking import STEPS_GRID, eps_grid, in_memory, masking_checks, noise, robustness_curves

EPS, STEP = 8 / 255, 4 / 255
N = 100


class Linear(torch.nn.Module):
    def __init__(self, w: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.w, self.scale = w, scale

    def forward(self, x):
        gap = (x.flatten(1) - 0.5) @ self.w
        return torch.stack([-gap, gap], 1) * (self.scale / 2)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 8 * 8, generator=g)
    c = torch.rand(N, generator=g, dtype=torch.float64) * 0.06 + 0.002  # flip distances in (0.002, 0.062)
    for e in eps_grid(EPS):  # no image within float error of a grid point (PGD ends exactly on its boundary)
        c[(c - e).abs() < 1e-4] += 2e-4
    s = torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0)
    x = (0.5 + (s[:, None] * c[:, None]).float() * w.sign()).reshape(N, 3, 8, 8)
    y = (s > 0).long()
    return w, c, x, y


def analytic_ra(c, e):
    return 100.0 * float((c > e).double().mean())


def curves_of(model, problem, queries=1000):
    _, _, x, y = problem
    return robustness_curves(model, in_memory(x, y, range(N)), EPS, STEP, 10, seed=0, square_queries=queries)


@pytest.fixture(scope="module")
def linear_curves(problem):
    return curves_of(Linear(problem[0]).eval(), problem)


def test_the_curves_of_a_linear_model_are_its_analytic_worst_case(problem, linear_curves):
    c = problem[1]
    assert linear_curves["SA"] == 100.0 and linear_curves["n"] == N
    assert linear_curves["eps_grid"] == pytest.approx([k / 255 for k in (0, 2, 4, 8, 12, 16, 32)])
    assert linear_curves["ra_vs_eps"][0] == linear_curves["SA"]  # ε = 0: no attack
    for e, ra in zip(linear_curves["eps_grid"], linear_curves["ra_vs_eps"]):
        assert ra == pytest.approx(analytic_ra(c, e)), e
    assert linear_curves["steps_grid"] == list(STEPS_GRID)
    assert linear_curves["ra_vs_steps"] == pytest.approx([analytic_ra(c, EPS)] * len(STEPS_GRID))
    assert linear_curves["square"]["RA"] >= analytic_ra(c, EPS)  # nothing beats the worst case


def test_every_check_passes_on_the_linear_model(linear_curves):
    checks = masking_checks(linear_curves, ra=linear_curves["ra_vs_steps"][0], aa=linear_curves["ra_vs_steps"][0])
    assert set(checks) == {"ra_non_increasing_in_eps", "ra_near_zero_at_largest_eps", "more_steps_do_not_raise_ra",
                           "black_box_not_stronger", "aa_not_above_ra"}
    assert all(check["pass"] for check in checks.values()), checks
    assert checks["ra_near_zero_at_largest_eps"]["RA"] == 0.0


def test_a_saturated_softmax_fails_the_masking_checks(problem):
    """Gradients vanish: PGD finds (almost) nothing, even at 4× ε; Square, which needs no gradient, does."""
    c = problem[1]
    curves = curves_of(Linear(problem[0], scale=1e4).eval(), problem)
    assert curves["SA"] == 100.0
    assert min(curves["ra_vs_steps"]) > analytic_ra(c, EPS) + 30  # looks robust
    checks = masking_checks(curves)
    assert not checks["ra_near_zero_at_largest_eps"]["pass"], checks
    assert not checks["black_box_not_stronger"]["pass"], checks
    assert checks["black_box_not_stronger"]["square_RA"] < checks["black_box_not_stronger"]["pgd_RA"] - 30


def test_the_checks_decide_on_the_numbers_given():
    """Hand-made curves: every verdict and its numbers, against the rules written out."""
    n = 200
    curves = {"n": n, "eps": EPS, "eps_grid": eps_grid(EPS), "ra_vs_eps": [90, 70, 55, 40, 41.5, 20, 6],
              "steps_grid": list(STEPS_GRID), "ra_vs_steps": [42, 40, 40.5, 39, 39], "square": {"RA": 38}}
    assert noise(n) == 1.0  # 1 % of 200 images = 2 images = 1 point
    checks = masking_checks(curves, ra=40, aa=41)
    assert checks["ra_non_increasing_in_eps"] == {"pass": False, "largest_rise": 1.5, "tolerance": 1.0}
    assert checks["ra_near_zero_at_largest_eps"] == {"pass": False, "eps": pytest.approx(32 / 255), "RA": 6,
                                                     "threshold": 5.0}
    assert checks["more_steps_do_not_raise_ra"] == {"pass": True, "largest_rise": 0.5, "tolerance": 1.0}
    assert checks["black_box_not_stronger"] == {"pass": True, "square_RA": 38, "pgd_RA": 39, "tolerance": 1.0}
    assert checks["aa_not_above_ra"] == {"pass": False, "AA": 41, "RA": 40}
    assert noise(50) == 2.0  # at least one image
    assert np.isclose(eps_grid(16 / 255)[-1], 64 / 255)  # scaled to the run's threat model
