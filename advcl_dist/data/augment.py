"""Batched, per-sample random augmentations on the device, with torchvision's semantics.

Each sample draws its own parameters from a `rng.StepRandom` on the batch's device (which makes them
independent of the number of ranks), so views are reproducible and resumable, and nothing here syncs
with the host (no `.item()`, no boolean indexing). A call draws one row of uniforms per sample: 3 for
the crop + flip view, then 33 per SimCLR view.

`batch_views` makes several views of a batch in a number of kernels that depends neither on the batch
size nor on the number of views: one sampling grid holds every crop, resize and flip of every view (the
positions torch's bilinear interpolation reads in each box), read by grid_sample, bilinear for the
RandomResizedCrop views and nearest for the crop view, whose positions are whole pixels (exact copies,
zeros outside the image: the padding). The colour ops then run once over all the SimCLR views
(augment_colour.py). Constants live in cached tensors: on CPU a Python number in a tensor op costs a
conversion per call. Own implementation rather than kornia 0.9, which draws one jitter order per batch,
not torchvision's one per sample.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from advcl_dist.data.augment_colour import color_jitter, random_grayscale
from advcl_dist.rng import StepRandom, uniform

RandomSource = StepRandom

__all__ = ["batch_views", "crop_flip_view", "simclr_view", "to_float"]

TRIES = 10  # RandomResizedCrop's attempts before its central fallback
# Columns of a SimCLR view's uniforms: TRIES scales, TRIES log-ratios, then left, top, flip (the crop view's
# 3), then these.
_APPLY, _FACTORS, _ORDER, _GRAY = 2 * TRIES + 3, 2 * TRIES + 4, 2 * TRIES + 8, 2 * TRIES + 12
SIMCLR_DRAWS = 2 * TRIES + 13


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is only cast to float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def _fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """RandomResizedCrop's central box (h, w) when no try fits: the image clamped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


@functools.lru_cache(maxsize=32)
def _constants(device, height, width, size, pad, crop, simclr, scale, ratio, flip_p, jitter, jitter_p,
               gray_p) -> SimpleNamespace:
    """The tensors batch_views needs for one configuration; pairs are (x, y), rows [views, 2] one per view."""
    def t(value, dtype=torch.float32):
        return torch.tensor(value, device=device, dtype=dtype)

    fb_h, fb_w = _fallback(height, width, ratio)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    centres = torch.arange(size, device=device, dtype=torch.float32).view(size, 1) + 0.5
    return SimpleNamespace(
        zero=t(0.0), one=t(1.0), minus_half=t(-0.5), size=t(float(size)), flip_p=t(flip_p),
        area_lo=t(height * width * scale[0]), area_span=t(height * width * (scale[1] - scale[0])),
        log_lo=t(log_lo), log_span=t(log_hi - log_lo), wh_max=t([[width], [height]]), fallback_wh=t([fb_w, fb_h]),
        # a fallback box starts at the centre: the uniforms that floor to it, and to keep the flip's
        central=t([((width - fb_w) // 2 + 0.5) / (width + 1 - fb_w), ((height - fb_h) // 2 + 0.5) / (height + 1 - fb_h),
                   0.0]),
        flip_column=t([False, False, True], torch.bool), crop_side=t([[[size, size]]]),
        # where a box may start: the crop view's in the zero-padded image, RandomResizedCrop's in the image
        extent=t([[width + 2 * pad + 1, height + 2 * pad + 1]] * crop + [[width + 1, height + 1]] * simclr),
        offset=t([[-pad, -pad]] * crop + [[0, 0]] * simclr),
        x_axis=t([True, False], torch.bool), x_only=t([1.0, 0.0]), y_only=t([0.0, 1.0]),
        centres=centres, flipped=size - centres,
        # grid_sample's coordinate (align_corners=False) of pixel position p on an axis of n pixels: (2p + 1)/n − 1
        grid_scale=t([2 / width, 2 / height]), grid_offset=t([1 / width - 1, 1 / height - 1]),
        jitter_p=t(jitter_p), gray_p=t(gray_p),
        # ColorJitter's factor ranges (brightness, contrast, saturation, hue) and the factors of "no jitter"
        jitter_low=t([max(0.0, 1.0 - j) for j in jitter[:3]] + [-jitter[3]]),
        jitter_span=t([1.0 + j - max(0.0, 1.0 - j) for j in jitter[:3]] + [2 * jitter[3]]),
        no_jitter=t([1.0, 1.0, 1.0, 0.0]),
    )


def _resized_crop_boxes(u: torch.Tensor, k: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's box side (w, h) [..., 2] from the uniforms u [..., 2·tries + 3] of its tries and
    of (left, top, flip): all tries at once, the first that fits wins; where none fits, the central fallback
    box, whose start uniforms are replaced by ones that floor to the centre. Returns (w, h) and the uniforms."""
    tries = (u.shape[-1] - 3) // 2
    target = torch.addcmul(k.area_lo, u[..., :tries], k.area_span)
    aspect = torch.exp(torch.addcmul(k.log_lo, u[..., tries : 2 * tries], k.log_span))
    wh = torch.stack((target * aspect, target / aspect), dim=-2).sqrt().round()  # [..., 2, tries]
    fits = (wh == wh.clamp(k.one, k.wh_max)).min(dim=-2, keepdim=True)[0]
    found, first = fits.max(dim=-1, keepdim=True)  # the index of the first maximum: the first try that fits
    lead = first.shape[:-2]
    chosen = wh.gather(-1, first.expand(*lead, 2, 1)).view(*lead, 2)
    found = found.view(*lead, 1)
    return torch.where(found, chosen, k.fallback_wh), torch.where(found | k.flip_column, u[..., -3:], k.central)


def _boxes(crop_unif: torch.Tensor | None, u: torch.Tensor | None, k: SimpleNamespace):
    """Each view's box from its uniforms, the crop view's [B, 1, 3] and the SimCLR views' [B, V, draws]
    (either may be None): start (x, y) [B, V, 2] (the crop view's may be negative: zero padding), side
    (w, h) [B, V, 2] and hflip [B, V]."""
    if u is not None:
        wh, box_unif = _resized_crop_boxes(u[..., : 2 * TRIES + 3], k)
    if crop_unif is None:
        unif, length = box_unif, wh
    else:
        unif, length = crop_unif, k.crop_side.expand(crop_unif.shape[0], 1, 2)
        if u is not None:
            unif, length = torch.cat((unif, box_unif), dim=1), torch.cat((length, wh), dim=1)
    room = k.extent - length  # how many positions each box can start at
    start = torch.floor(unif[..., :2] * room).clamp(max=room - k.one) + k.offset
    return start, length, unif[..., 2] < k.flip_p


def _grid(start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor, k: SimpleNamespace) -> torch.Tensor:
    """grid_sample's grid [B, V·S, S, 2] reading, for each view of each sample, its box (start, length
    [B, V, 2] as (x, y)) resized to S x S the way torch's bilinear interpolation (align_corners=False) reads
    the cropped box, columns reversed where `flip` [B, V]. A box of side S reads whole pixel positions."""
    batch, views = flip.shape
    size = k.centres.shape[0]
    centres = torch.where(flip.view(batch, views, 1, 1) & k.x_axis, k.flipped, k.centres)  # [B, V, S, 2]
    src = torch.addcmul(k.minus_half, centres, (length / k.size).view(batch, views, 1, 2))
    src = src.clamp(k.zero, (length - k.one).view(batch, views, 1, 2))
    xy = torch.addcmul(k.grid_offset, src + start.view(batch, views, 1, 2), k.grid_scale)
    # grid[b, v, i, j] = (x_j, y_i)
    grid = torch.addcmul((xy * k.y_only).view(batch, views, size, 1, 2), xy.view(batch, views, 1, size, 2), k.x_only)
    return grid.view(batch, views * size, size, 2)


def batch_views(
    images: torch.Tensor,
    generator: RandomSource,
    size: int = 32,
    padding: int = 4,
    crop: bool = True,
    simclr: int = 2,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    gray_p: float = 0.2,
    flip_p: float = 0.5,
) -> list[torch.Tensor]:
    """The crop + flip view (if `crop`), then `simclr` SimCLR views of a batch; float32 [B, 3, S, S] each.

    Crop + flip: RandomCrop(size, padding, zero fill) + hflip. SimCLR: RandomResizedCrop(size, scale, ratio),
    hflip, ColorJitter (p=jitter_p), RandomGrayscale (p=gray_p). Draws [B, 3] uniforms for the crop view,
    then [B, simclr, 33] for the SimCLR views.
    """
    x = to_float(images)
    batch, channels, height, width = x.shape
    pad = padding if crop else 0
    k = _constants(x.device, height, width, size, pad, int(crop), simclr, tuple(scale), tuple(ratio), float(flip_p),
                   tuple(float(j) for j in jitter), float(jitter_p), float(gray_p))
    crop_unif = uniform(generator, (batch, 3)).view(batch, 1, 3) if crop else None
    u = uniform(generator, (batch, simclr * SIMCLR_DRAWS)).view(batch, simclr, SIMCLR_DRAWS) if simclr else None
    grid = _grid(*_boxes(crop_unif, u, k), k)
    if grid.dtype != x.dtype:
        grid = grid.to(x.dtype)
    out = []
    if crop:  # nearest pixels of whole positions: exact copies, and zeros outside the image (the padding)
        out.append(F.grid_sample(x, grid[:, :size], mode="nearest", padding_mode="zeros", align_corners=False))
    if not simclr:
        return out
    sims = F.grid_sample(x, grid[:, size * crop :], mode="bilinear", padding_mode="border", align_corners=False)
    # Bilinear weights can overshoot 1 by an ulp; clamp so un-jittered samples stay in [0, 1] too.
    sims = sims.view(batch, channels, simclr, size, size).clamp(0.0, 1.0)  # [B, C, V, S, S]
    factors = torch.addcmul(k.jitter_low, u[..., _FACTORS : _FACTORS + 4], k.jitter_span)
    factors = torch.where(u[..., _APPLY : _APPLY + 1] < k.jitter_p, factors, k.no_jitter)
    order = u[..., _ORDER : _ORDER + 4].sort(dim=-1)[1]
    sims = random_grayscale(color_jitter(sims, factors, order), u[..., _GRAY] < k.gray_p)
    return out + list(sims.unbind(2))


def simclr_view(
    images: torch.Tensor,
    generator: RandomSource,
    size: int = 32,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    gray_p: float = 0.2,
    flip_p: float = 0.5,
) -> torch.Tensor:
    """SimCLR view: RandomResizedCrop, hflip, ColorJitter (p=jitter_p), RandomGrayscale; float32 [B,3,S,S]."""
    return batch_views(images, generator, size, crop=False, simclr=1, scale=scale, ratio=ratio, jitter=jitter,
                       jitter_p=jitter_p, gray_p=gray_p, flip_p=flip_p)[0]


def crop_flip_view(
    images: torch.Tensor,
    generator: RandomSource,
    size: int = 32,
    padding: int = 4,
    flip_p: float = 0.5,
) -> torch.Tensor:
    """RandomCrop(size, padding, zero fill) + hflip, exact pixel copies; float32 [B, 3, S, S]."""
    return batch_views(images, generator, size, padding, crop=True, simclr=0, flip_p=flip_p)[0]
