"""Invariant regularisers SIR and AIR of Xu et al. (NeurIPS 2023), "Enhancing Adversarial Contrastive Learning
via Adversarial Invariant Regularization" (arXiv 2305.00374, Sec. 3; repo GodXuxilie/Enhancing_ACL_via_AIR,
AIR.py and pretraining.py). Pure functions, shared by the ACL and DynACL methods.

Notation: x the un-augmented image, τ_u(x) its two natural views (u = 1, 2), x̃_u the adversarial
counterpart of τ_u(x), f the L2-normalised projection, sim the cosine similarity, t the temperature
(0.5 in the authors' pretraining.py, `AIR_Loss(temperature=0.5)`). Every distribution is a softmax over
the samples k of the batch B (not over classes):

    p_u(y^R | x)   = exp(sim(f(x), f(τ_u(x))) / t)  / Σ_k exp(sim(f(x_k), f(τ_u(x_k))) / t)
    p_u(y^R | x̃)  = exp(sim(f(x), f(x̃_u)) / t)      / Σ_k exp(sim(f(x_k), f(x̃_u,k)) / t)
    p_u(x̃ | x)    = exp(sim(f(x̃_u), f(τ_u(x))) / t) / Σ_k exp(sim(f(x̃_u,k), f(τ_u(x_k))) / t)

    SIR = KL(p_1(y^R | x) ‖ p_2(y^R | x); B)                                   (standard invariant reg.)
    AIR = KL(p_1(y^R | x̃) p_1(x̃ | x) ‖ p_2(y^R | x̃) p_2(x̃ | x); B)          (adversarial invariant reg.)

with KL(p ‖ q; B) = Σ_{x∈B} p(x) log(p(x) / q(x)), summed (not averaged) over the batch; the products in
AIR are not renormalised. Nothing is detached: the authors' code back-propagates into all five inputs.
The total objective (pretraining.py / AIR.py) is (1 − w)·L_nat + (1 + w)·L_adv + λ1·SIR + λ2·AIR
(w = 0 for ACL, DynACL's schedule otherwise); λ1 = `sir_weight`, λ2 = `air_weight` live in the methods.

Where the authors' code differs (not copied; selectable with `kl_form="authors_code"` to reproduce it):
AIR.py calls `F.kl_div(input, target, log_target=True)` with *probabilities* as `input` where PyTorch
expects log-probabilities, and with view 2 as the target, so it computes Σ_k q(k)·(log q(k) − p(k))
(p = view-1 distribution, q = view-2 distribution) instead of KL(p ‖ q). The default is the paper's KL.

Global batch: with `gather=True` the per-sample similarities (6 scalars per sample) are gathered over all
ranks (distributed.gather_rows) and every rank computes the same global-batch KL, so 1 rank == N ranks in
value and, since gather_rows sums gradients over ranks and DDP averages them, in gradient. The authors
train on one GPU (batch 512), i.e. the softmax runs over the whole batch as here.

The original-image projection f(x) (`orig`) is part of both distributions of the paper and of the
authors' code (`z_orig`: the un-augmented image through the `normal` BN branch); it must be passed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import gather_rows

KL_FORMS = ("paper", "authors_code")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, kl_form: str) -> torch.Tensor:
    """Σ_k p (log p − log q) (paper), or the authors' Σ_k q (log q − p) (see the module docstring)."""
    if kl_form == "paper":
        return (log_p.exp() * (log_p - log_q)).sum()
    return (log_q.exp() * (log_q - log_p.exp())).sum()


def invariance_regularisers(nat1: torch.Tensor, nat2: torch.Tensor, adv1: torch.Tensor, adv2: torch.Tensor,
                            temperature: float, gather: bool = True, *, orig: torch.Tensor | None = None,
                            kl_form: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """(SIR, AIR) of Xu et al. 2023 (module docstring) for projections [B, D] (L2-normalised here).

    `nat1`, `nat2`: the two natural views τ_1(x), τ_2(x); `adv1`, `adv2`: their adversarial counterparts;
    `orig` (keyword, required): the un-augmented image x. Returns two float32 scalars, the same on every
    rank when `gather` is true (softmax over the global batch).
    """
    if orig is None:
        raise ValueError("invariance_regularisers needs orig=<projection of the un-augmented image x> [B, D]: "
                         "both SIR and AIR compare each view with f(x) (Xu et al. 2023, Sec. 3; z_orig in the "
                         "authors' pretraining.py)")
    if kl_form not in KL_FORMS:
        raise ValueError(f"kl_form must be one of {KL_FORMS}, got {kl_form!r}")
    shapes = {tuple(t.shape) for t in (nat1, nat2, adv1, adv2, orig)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"nat1, nat2, adv1, adv2, orig must all be [B, D], got {sorted(shapes)}")
    with torch.autocast(nat1.device.type, enabled=False):
        n1, n2, a1, a2, o = (F.normalize(t.to(torch.promote_types(t.dtype, torch.float32)), dim=-1)
                             for t in (nat1, nat2, adv1, adv2, orig))

        def sim(u, v):
            return (u * v).sum(-1) / temperature

        scores = torch.stack([sim(o, n1), sim(o, n2),   # p_u(y^R | x)
                              sim(o, a1), sim(o, a2),   # p_u(y^R | x̃)
                              sim(a1, n1), sim(a2, n2)],  # p_u(x̃ | x)
                             dim=1)
        if gather:
            scores, _ = gather_rows(scores)
        log_p = torch.log_softmax(scores, dim=0)  # each column: a distribution over the (global) batch
        sir = _kl(log_p[:, 0], log_p[:, 1], kl_form)
        air = _kl(log_p[:, 2] + log_p[:, 4], log_p[:, 3] + log_p[:, 5], kl_form)
    return sir, air


__all__ = ["KL_FORMS", "invariance_regularisers"]
