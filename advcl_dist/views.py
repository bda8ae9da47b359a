"""Frequency views of AdvCL (paper eq. 8): split an image batch into its low and high frequency parts.

The high-frequency view is the extra view AdvCL feeds to the contrastive loss; the two parts sum back to the
input, so either one can also be obtained as the complement of the other.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["high_frequency", "low_frequency"]


@functools.lru_cache(maxsize=32)
def _low_pass_mask(height: int, width: int, radius: float, device: torch.device) -> torch.Tensor:
    """Bool [H, W] disk `dist < radius` around (H//2, W//2), pre-shifted with ifftshift.

    Masking the unshifted spectrum with the ifftshift-ed mask is exactly the same product as
    fftshift -> mask -> ifftshift (both shifts are permutations), but saves two shifts per call.
    """
    u = torch.arange(height, device=device, dtype=torch.float64) - height // 2
    v = torch.arange(width, device=device, dtype=torch.float64) - width // 2
    dist = torch.sqrt(u[:, None] ** 2 + v[None, :] ** 2)
    return torch.fft.ifftshift(dist < radius, dim=(-2, -1))


def _band(x: torch.Tensor, radius: float, low: bool) -> torch.Tensor:
    """Keep the low (or high) band of x per channel; the FFT runs in fp32/fp64 whatever x.dtype is."""
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mask = _low_pass_mask(x.shape[-2], x.shape[-1], float(radius), x.device)
    if not low:
        mask = ~mask
    with torch.autocast(device_type=x.device.type, enabled=False):
        spectrum = torch.fft.fft2(x.to(compute_dtype), dim=(-2, -1))
        out = torch.fft.ifft2(spectrum * mask, dim=(-2, -1)).real
    return out.to(x.dtype)


def low_frequency(x: torch.Tensor, radius: float = 8.0) -> torch.Tensor:
    """Low-pass view of x [N, C, H, W]: frequencies within `radius` of the spectrum centre."""
    return _band(x, radius, low=True)


def high_frequency(x: torch.Tensor, radius: float = 8.0) -> torch.Tensor:
    """High-pass view of x [N, C, H, W]: everything low_frequency drops; low + high == x."""
    return _band(x, radius, low=False)
