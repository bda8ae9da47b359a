"""Gradient-masking checks: is a robust accuracy real, or did the attack's gradients fail?

A model can look robust because PGD's gradients are useless on it (shattered, vanishing or stochastic
gradients: Athalye et al., ICML 2018), not because it is. Carlini et al. 2019 ("On evaluating adversarial
robustness", §5) list the symptoms to rule out, and the AdvCL paper (Figure 3) plots the first two:
- accuracy under attack must not rise with ε, and must reach ~0 at a large ε (there every image can be
  changed into another class's);
- more attack iterations must not raise it (beyond noise);
- a black-box attack (Square, which uses no gradient) must not beat the white-box one;
- AutoAttack, the stronger ensemble, must find at least what PGD finds: AA ≤ RA.

`robustness_curves` measures RA against ε and against PGD steps (plus Square at the run's ε) on a set of
images; `masking_checks` turns those numbers into pass/fail verdicts with the numbers that decided them.
"""
from __future__ import annotations

import torch

EPS_GRID_255 = (0, 2, 4, 8, 12, 16, 32)  # ε / 255 for the paper's ε = 8/255; scaled to the run's ε
STEPS_GRID = (5, 10, 20, 50, 100)
PAPER_EPS = 8 / 255
NEAR_ZERO = 5.0  # % "RA at the largest ε near 0": at 4× the run's ε almost no image should survive


def eps_grid(run_eps: float) -> list[float]:
    """The ε values of the RA-vs-ε curve, scaled so that the grid's 8/255 is the run's ε."""
    return [e / 255 * run_eps / PAPER_EPS for e in EPS_GRID_255]


def square_flags(model, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int, seed: int) -> torch.Tensor:
    """Per-image correctness under the Square attack (L∞, margin loss; AutoAttack's black-box member)."""
    from pyautoattack.square import SquareAttack

    from .evaluate import correct_within_ball

    attack = SquareAttack(model, norm="Linf", eps=eps, n_queries=queries, seed=seed, device=x.device)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):  # it reseeds the global RNG
        with torch.no_grad():
            x_adv = attack.perturb(x, y)
    return correct_within_ball(model, x, x_adv, y, eps, len(x), "Square")


def robustness_curves(model, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, eps: float, step_size: float,
                      steps: int, seed: int, square_queries: int = 5000) -> dict:
    """RA (%) of `model` ([0, 1] images → logits, eval mode) on images `x`, labels `y`:
    against ε (`eps_grid(eps)`, PGD-`steps`, the step size scaled with ε), against PGD steps
    (`STEPS_GRID` at `eps`), and under Square at `eps` (`square_queries` queries; 0 leaves it out).
    An image's PGD random start depends on (seed, its index in `indices`) only, as in the evaluation."""
    # the evaluation's own attack and percentages, so that the curves measure what its RA measures
    from .evaluate import percent, pgd_block

    def robust(e: float, k: int) -> float:
        return percent(pgd_block(model, e, step_size * e / eps, k, seed)(x, y, indices, 0)[1].cpu().numpy())

    with torch.no_grad():
        clean = model(x).argmax(1) == y
    grid = eps_grid(eps)
    curves = {"n": len(y), "SA": percent(clean.cpu().numpy()), "eps": eps, "steps": steps,
              "eps_grid": grid, "ra_vs_eps": [robust(e, steps) for e in grid],
              "steps_grid": list(STEPS_GRID), "ra_vs_steps": [robust(eps, k) for k in STEPS_GRID]}
    if square_queries:
        square = square_flags(model, x, y, eps, square_queries, seed)
        curves["square"] = {"queries": square_queries, "RA": percent(square.cpu().numpy())}
    return curves


def noise(n: int) -> float:
    """Points of RA that one comparison of attacks on the same n images may differ by without meaning
    anything: 1 % of the images, at least one image."""
    return max(1.0, 0.01 * n) * 100.0 / n


def masking_checks(curves: dict, ra: float | None = None, aa: float | None = None) -> dict[str, dict]:
    """Each check {"pass": bool, ...its numbers}. `ra` / `aa`: the evaluation's RA and AA on the same
    images (AA ≤ RA is checked when both are given)."""
    tol = noise(curves["n"])
    eps_ra, steps_ra = curves["ra_vs_eps"], curves["ra_vs_steps"]
    rise_eps = max((b - a for a, b in zip(eps_ra, eps_ra[1:])), default=0.0)
    rise_steps = max((b - a for a, b in zip(steps_ra, steps_ra[1:])), default=0.0)
    white_box = min(steps_ra)  # the strongest PGD at the run's ε
    checks = {
        "ra_non_increasing_in_eps": {"pass": rise_eps <= tol, "largest_rise": rise_eps, "tolerance": tol},
        "ra_near_zero_at_largest_eps": {"pass": eps_ra[-1] <= NEAR_ZERO, "eps": curves["eps_grid"][-1],
                                        "RA": eps_ra[-1], "threshold": NEAR_ZERO},
        "more_steps_do_not_raise_ra": {"pass": rise_steps <= tol, "largest_rise": rise_steps, "tolerance": tol},
    }
    if "square" in curves:
        black_box = curves["square"]["RA"]
        checks["black_box_not_stronger"] = {"pass": black_box >= white_box - tol, "square_RA": black_box,
                                            "pgd_RA": white_box, "tolerance": tol}
    if ra is not None and aa is not None:
        checks["aa_not_above_ra"] = {"pass": aa <= ra, "AA": aa, "RA": ra}
    return checks
