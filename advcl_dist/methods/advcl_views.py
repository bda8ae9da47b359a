"""AdvCL's contrastive view sets (`advcl.views`): the tokens, their validation, and the views of a batch.

A view set is a list of tokens, each a base view optionally suffixed `_adv` (that view plus its own
perturbation δ, found by PGD through the `pgd` BN branch):

- `x`: the lightly augmented image (RandomCrop with padding + flip), the view AdvCL attacks (paper eq. 7);
- `t1`, `t2`: the two SimCLR views;
- `x_h`: the high-frequency component of x (paper eq. 8: the spectrum outside the disk of radius r);
- `x_l`: the low-frequency component of x, the disk's inside, with the same r, so x_l + x_h = x. The
  paper contrasts x_h with x_l in its view-selection ablation; the authors' repo (LijieFan/AdvCL,
  fr_util.generate_high) codes only x_h, so x_l as the complement of the same mask is our reading.

AdvCL itself is `[x_adv, t1, t2, x_h]` (eq. 9). The rows of the paper's view-selection ablation (Table 4,
as listed in our brief; the row list was not checked against the paper's text here) are TABLE4_VIEW_SETS;
ACL's A2A pair `[t1_adv, t2_adv]` is one of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.augment import batch_views
from ..views import high_frequency, low_frequency
from .simclr import view_settings

BASES = ("x", "t1", "t2", "x_l", "x_h")
ADV = "_adv"
# x_l and x_h are not images in [0, 1] (x_h is centred on 0): PGD's clamp to [0, 1] would change them even
# with δ = 0, and the paper attacks only image views.
ATTACKABLE = ("x", "t1", "t2")
TOKENS = BASES + tuple(base + ADV for base in ATTACKABLE)
ADVCL_VIEW_SET = ("x_adv", "t1", "t2", "x_h")  # eq. (9), the authors' pretraining_advCL.py
TABLE4_VIEW_SETS = (
    ("t1_adv", "t2"),
    ("t1_adv", "t2_adv"),  # ACL (Jiang et al. 2020), A2A
    ("x_adv", "t1", "t2"),
    ("x_adv", "t1", "t2", "x_l"),
    ADVCL_VIEW_SET,
    ("x_adv", "t1", "t2", "x_l", "x_h"),
)


@dataclass(frozen=True)
class View:
    """One token of a view set: its base view and whether it carries its own δ."""

    base: str
    adversarial: bool

    @property
    def token(self) -> str:
        return self.base + (ADV if self.adversarial else "")


def view_set_problem(tokens) -> str | None:
    """What is wrong with a view set, as the end of a one-line error naming `advcl.views`; None if valid."""
    tokens = list(tokens)
    valid = f"valid tokens: {list(TOKENS)}; AdvCL's set is {list(ADVCL_VIEW_SET)}"
    unknown = [t for t in tokens if t not in TOKENS]
    if unknown:
        frequency = [t for t in unknown if t in ("x_l" + ADV, "x_h" + ADV)]
        why = (f" ({frequency[0]}: x_l and x_h are not images in [0, 1], so PGD does not attack them)"
               if frequency else "")
        return f"unknown view token(s) {unknown}{why}; {valid}"
    if len(tokens) < 2:
        return f"{tokens} has fewer than 2 views; a contrastive loss needs at least 2 ({valid})"
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        return f"{tokens} lists {repeated} more than once; give each view once ({valid})"
    if not any(t.endswith(ADV) for t in tokens):
        return (f"{tokens} has no adversarial view (a token ending in {ADV!r}); without one this is standard "
                "contrastive learning: use train.method=simclr, or add e.g. x_adv")
    return None


def parse_view_set(tokens) -> tuple[View, ...]:
    """The views of a valid token list, in order (ValueError naming advcl.views otherwise)."""
    problem = view_set_problem(tokens)
    if problem is not None:
        raise ValueError(f"config key 'advcl.views': {problem}")
    return tuple(View(t[: -len(ADV)], True) if t.endswith(ADV) else View(t, False) for t in tokens)


def make_views(images: torch.Tensor, generator, views_cfg, radius: float, bases=ADVCL_VIEW_SET) -> dict:
    """{base: view} for x, t1, t2 and whichever of x_l, x_h `bases` names (tokens are accepted too).

    x, t1 and t2 are always drawn, in one batch_views call (the authors' order: crop view, then two SimCLR
    views), so that every view set sees the same x, t1, t2 for the same seed and step; x_l and x_h are
    made from x (radius r = advcl.hf_radius).
    """
    wanted = {token.removesuffix(ADV) for token in bases}
    x, t1, t2 = batch_views(images, generator, crop=True, simclr=2, **view_settings(views_cfg))
    views = {"x": x, "t1": t1, "t2": t2}
    if "x_l" in wanted:
        views["x_l"] = low_frequency(x, radius)
    if "x_h" in wanted:
        views["x_h"] = high_frequency(x, radius)
    return views


def variant_name(tokens) -> str:
    """The registered variant name of a view set, e.g. ("t1_adv", "t2") → "advcl_t1adv_t2"."""
    return "advcl_" + "_".join(token.replace("_", "") for token in tokens)
