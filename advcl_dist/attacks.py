"""Projected gradient descent in L∞ for any differentiable objective.

One PGD serves pretraining (contrastive and pseudo-label objectives), finetuning and
evaluation. The perturbation and its arithmetic stay float32 even when the objective
runs under autocast: the input leaf is float32, so its gradient is too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .rng import StepRandom


def ramp(step: int, steps_per_epoch: int, ramp_epochs: float) -> float:
    """The share of ε (and of the step size) a pretraining attack uses at 0-based `step`: linear from
    1/n to 1 over the first n = ramp_epochs · steps_per_epoch steps, then 1 (`attack.eps_ramp_epochs`)."""
    if ramp_epochs <= 0:
        return 1.0
    return min(1.0, (step + 1) / (ramp_epochs * steps_per_epoch))


@dataclass(frozen=True)
class PGDResult:
    x_adv: torch.Tensor  # detached, float32 (float64 for float64 x), within the ε-ball around x and [0, 1]
    initial_loss: torch.Tensor  # objective at the starting point (detached scalar; [segments] for several)
    last_loss: torch.Tensor  # objective at the input of the last step (likewise)


def pgd(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, step_size: float,
        steps: int, random_start: bool = True, generator: StepRandom | None = None,
        segments: int = 1) -> PGDResult:
    """Maximise `objective(x_adv)` (a scalar) by `steps` signed-gradient steps of `step_size`.

    Each step is projected onto the L∞ ball of radius `eps` around `x` and clamped to
    [0, 1]. The random start is uniform in the ball (then clamped), drawn from `generator.noise`
    (per rank, or per image after `StepRandom.keyed`; torch's global RNG when None). Gradients reach
    only the input: parameters' `.grad` are untouched.

    `segments` > 1 runs that many independent attacks in one: `x` holds their inputs as equal
    row blocks and `objective` returns one loss per block ([segments]), each depending on its
    own block only (e.g. one forward with per-block BN statistics). Ascending their sum moves
    every block along its own loss's gradient, so the result equals separate calls, with one
    forward and backward per step instead of `segments`. The random starts are drawn block by
    block, as separate calls would draw them; the result's losses are [segments].
    """
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))  # never below fp32
    if x.shape[0] % segments:
        raise ValueError(f"pgd: {x.shape[0]} rows do not split into {segments} equal segments")
    if random_start:
        noise = torch.cat([torch.rand(block.shape, device=x.device, dtype=x.dtype) if generator is None
                           else generator.noise(block.shape, x.dtype) for block in x.chunk(segments)])
        x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    else:
        x_adv = x.clone()
    initial = last = x.new_zeros(() if segments == 1 else (segments,))
    for step in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = objective(x_adv)
        if loss.shape != initial.shape:
            raise ValueError(f"pgd: the objective returned shape {tuple(loss.shape)}; with segments={segments} "
                             f"it must return {tuple(initial.shape)}")
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        last = loss.detach().float()
        if step == 0:
            initial = last
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return PGDResult(x_adv.detach(), initial, last)
