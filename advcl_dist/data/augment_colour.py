"""torchvision's ColorJitter and RandomGrayscale for a whole batch: per-sample factors, per-sample op order.

The number of kernels depends neither on the batch nor on its 24 possible orders. Brightness, contrast and
saturation are one blend `clamp(f·x + w·other)` whose `other` is 0, the mean luma or the luma (w = 1 − f);
the ops each sample has before its hue step run in 3 slots and those after it in 3 more, every slot
applying to each sample the op that sample has there (f = 1, w = 0, an exact identity, where it has none).
Hue, the costly op, runs once, torchvision's HSV round trip written as one formula per channel:
`max − (max − min)·clamp(min(k, 4 − k), 0, 1)` with k = (n + 6·hue) mod 6, n = 5, 3, 1 for R, G, B.

Images are [N, 3, *views, H, W]: each of N samples may have several views (batch_views' SimCLR views sit
between the channels and the pixels); per-sample parameters are [N, *views] (then the parameter's values).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

__all__ = ["color_jitter", "grayscale", "random_grayscale"]

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # op numbers in a sample's order
# The 6 slots: position in the sample's order, and whether the slot comes before the hue step.
_SLOT_POSITIONS = (0, 1, 2, 1, 2, 3)
_SLOT_BEFORE_HUE = (True, True, True, False, False, False)


@functools.lru_cache(maxsize=32)
def _constants(device: torch.device, dtype: torch.dtype, ndim: int, pixels: int = 1) -> SimpleNamespace:
    """Constants as tensors, made once per device: on CPU a Python number in a tensor op costs a conversion.
    Per-channel ones are [3, 1, ...] for images of `ndim` dimensions and `pixels` pixels."""
    def t(value, dt=dtype):
        return torch.tensor(value, device=device, dtype=dt)

    def channels(values, dt=dtype):
        return t(values, dt).view(3, *([1] * (ndim - 2)))

    return SimpleNamespace(
        weights=channels(_GRAY_WEIGHTS), zero=t(0.0), one=t(1.0), four=t(4.0), six=t(6.0), per_pixel=t(1 / pixels),
        hue_offsets=channels((5.0, 3.0, 1.0)), sector_offsets=channels((0.0, 2.0, 4.0)),
        # hue·6 = sector + (next channel − the one after) / (max − min); after R comes G, after G B, after B R
        next=channels((1, 2, 0), torch.long), after=channels((2, 0, 1), torch.long),
        positions=t(_SLOT_POSITIONS, torch.long), before=t(_SLOT_BEFORE_HUE, torch.bool),
        contrast=t(CONTRAST, torch.long), saturation=t(SATURATION, torch.long), hue=t(HUE, torch.long),
    )


def _per_image(p: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """Per-sample parameters [N, *views, *extra dims] viewed to broadcast against images [N, 3, *views, H, W]."""
    lead = p.shape[: p.dim() - extra]
    return p.view(lead[0], 1, *lead[1:], *p.shape[p.dim() - extra :], 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, ..., H, W] of RGB x [N, 3, ..., H, W] with torchvision's weights."""
    return (x * _constants(x.device, x.dtype, x.dim()).weights).sum(dim=1, keepdim=True)


def random_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """The luma on all 3 channels of the images where `apply` [N, *views] (bool) is set."""
    return torch.where(_per_image(apply), grayscale(x).expand(x.shape), x)


def _blend(x: torch.Tensor, factor: torch.Tensor, luma_weight: torch.Tensor, sum_weight: torch.Tensor):
    """clamp(f·x + w_l·luma + w_s·Σ luma) per image; w_s = w/(H·W) blends with the image's mean luma.

    torchvision's brightness is f alone, contrast w_s = (1 − f)/(H·W), saturation w_l = 1 − f.
    """
    luma = grayscale(x)
    other = torch.addcmul(sum_weight * luma.sum(dim=(1, -2, -1), keepdim=True), luma_weight, luma)
    return torch.addcmul(other, factor, x).clamp_(0.0, 1.0)


def _adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision adjust_hue per image (hue broadcast against x); a zero shift returns x untouched."""
    k = _constants(x.device, x.dtype, x.dim())
    maxc, argmax = x.max(dim=1, keepdim=True)  # the first maximum on ties: R, then G, then B, as torchvision
    delta = maxc - x.min(dim=1, keepdim=True)[0]
    diff = x.gather(1, k.next.expand(x.shape)) - x.gather(1, k.after.expand(x.shape))
    hue6 = (diff / torch.where(delta == k.zero, k.one, delta) + k.sector_offsets).gather(1, argmax)  # grey: 0
    shifted = torch.remainder(hue6 / k.six + hue, k.one)
    sector = torch.remainder(torch.addcmul(k.hue_offsets, shifted, k.six), k.six)
    out = torch.addcmul(maxc, delta, torch.minimum(sector, k.four - sector).clamp_(0.0, 1.0), value=-1)
    return torch.where(hue == k.zero, x, out)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter on images x [N, 3, *views, H, W] with factors [N, *views, 4] (brightness, contrast,
    saturation, hue) applied in the order [N, *views, 4] (a permutation of the op numbers 0 to 3) of each
    image, as torchvision does."""
    k = _constants(x.device, x.dtype, x.dim(), x.shape[-2] * x.shape[-1])
    hue_pos = (order == k.hue).max(dim=-1, keepdim=True)[1]
    active = torch.where(k.before, hue_pos > k.positions, hue_pos < k.positions)
    ops = torch.where(active, order.gather(-1, k.positions.expand(*order.shape[:-1], 6)), k.hue)  # HUE: no op
    if factors.dtype != x.dtype:
        factors = factors.to(x.dtype)
    factor = torch.where(ops == k.hue, k.one, factors.gather(-1, ops))
    rest = k.one - factor
    luma_weight = torch.where(ops == k.saturation, rest, k.zero)
    sum_weight = torch.where(ops == k.contrast, rest * k.per_pixel, k.zero)
    slots = [_per_image(p, 1) for p in (factor, luma_weight, sum_weight)]  # [N, 1, *views, 6, 1, 1]
    for slot in range(3):
        x = _blend(x, *(p.select(-3, slot) for p in slots))
    x = _adjust_hue(x, _per_image(factors, 1).select(-3, HUE))
    for slot in range(3, 6):
        x = _blend(x, *(p.select(-3, slot) for p in slots))
    return x
