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
tools/evaluate.py runs both on the AutoAttack images when `eval.curves=true` (results.json: `curves`,
`checks`; figure: curves.png).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .rng import step_seed

EPS_GRID_255 = (0, 2, 4, 8, 12, 16, 32)  # ε / 255 for the paper's ε = 8/255; scaled to the run's ε
STEPS_GRID = (5, 10, 20, 50, 100)
NEAR_ZERO = 5.0  # % "RA at the largest ε near 0": at 4× the run's ε almost no image should survive


def eps_grid(run_eps: float) -> list[float]:
    """The ε values of the RA-vs-ε curve, scaled so that the grid's 8/255 is the run's ε."""
    return [run_eps * e / 8 for e in EPS_GRID_255]  # e = 8 gives run_eps exactly


def square_block(model, eps: float, queries: int, seed: int):
    """Correctness under Square (L∞, margin loss; AutoAttack's black-box member) of a block, seeded by
    (seed, the block's first position): independent of the sharding, as AutoAttack's blocks are."""
    from pyautoattack.square import SquareAttack

    from .evaluate import correct_within_ball

    def run(x, y, block_indices, start):
        attack = SquareAttack(model, norm="Linf", eps=eps, n_queries=queries, device=x.device,
                              seed=step_seed(seed, start, 3) % 2**31)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):  # it reseeds torch's RNG
            with torch.no_grad():
                x_adv = attack.perturb(x, y)
        return correct_within_ball(model, x, x_adv, y, eps, len(x), "Square")[None]

    return run


Measure = Callable[[str, Callable, int], np.ndarray]


def in_memory(x: torch.Tensor, y: torch.Tensor, indices) -> Measure:
    """A `measure` for `robustness_curves` on images held in memory, attacked as one block."""
    return lambda name, run_block, rows: run_block(x, y, [int(i) for i in indices], 0).cpu().numpy()


def robustness_curves(model, measure: Measure, eps: float, step_size: float, steps: int, seed: int,
                      square_queries: int = 5000) -> dict:
    """RA (%) of `model` ([0, 1] images → logits, eval mode) on the images `measure` attacks: against ε
    (`eps_grid(eps)`, PGD-`steps`, the step size scaled with ε), against PGD steps (`STEPS_GRID` at `eps`),
    and under Square at `eps` (`square_queries` queries; 0 leaves it out).

    `measure(name, run_block, rows)` returns the flags [rows, n] of a block function (evaluate.pgd_block's
    form) over the images: the evaluation shards and caches them (eval_blocks.sharded_flags), `in_memory`
    runs them at once. The attack is the evaluation's own (per-image random starts from (seed, index)); the
    PGD at the run's (ε, steps) is named `pgd<steps>` as the evaluation's, which hands back its flags."""
    from .evaluate import percent, pgd_block  # the evaluation's attack and percentages: RA means the same

    if eps <= 0:
        raise ValueError(f"robustness curves need the run's ε > 0 (attack.eps), got {eps}")
    flags = {}

    def robust(e: float, k: int) -> float:
        if e == eps:  # exactly the evaluation's attack (same name, same step size to the last bit)
            name, step = f"pgd{k}", step_size
        else:
            name, step = f"pgd{k}-eps{e * 255:.4g}", step_size * e / eps
        if name not in flags:
            flags[name] = measure(name, pgd_block(model, e, step, k, seed), 2)
        return percent(flags[name][1])

    grid = eps_grid(eps)
    ra_vs_eps = [robust(e, steps) for e in grid]
    ra_vs_steps = [robust(eps, k) for k in STEPS_GRID]
    clean = flags[f"pgd{steps}"][0]  # at the run's ε: the grid holds it exactly
    curves = {"n": int(clean.size), "SA": percent(clean), "eps": eps, "steps": steps, "eps_grid": grid,
              "ra_vs_eps": ra_vs_eps, "steps_grid": list(STEPS_GRID), "ra_vs_steps": ra_vs_steps}
    if square_queries:
        square = measure(f"square{square_queries}", square_block(model, eps, square_queries, seed), 1)[0]
        curves["square"] = {"queries": square_queries, "RA": percent(square)}
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
