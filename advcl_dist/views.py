"""Frequency views of AdvCL (paper eq. 8): split an image batch into its low and high frequency parts.

The high-frequency view is the extra view AdvCL feeds to the contrastive loss; the two parts sum back to the
input, so either one can also be obtained as the complement of the other.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["high_frequency", "low_frequency"]


@functools.lru_cache(maxsize=32)
def _band_mask(height: int, width: int, radius: float, low: bool, dtype: torch.dtype, device: torch.device):
    """[H, W] spectrum weights of the low band, the disk `dist < radius` around (H//2, W//2) (or of the high
    band, its complement), pre-shifted with ifftshift, in the spectrum's complex `dtype`.

    Masking the unshifted spectrum with the ifftshift-ed mask is exactly the same product as
    fftshift -> mask -> ifftshift (both shifts are permutations), but saves two shifts per call; built once
    per shape and device, as the spectrum's dtype, so that a call is one FFT, one product and one inverse.
    """
    u = torch.arange(height, device=device, dtype=torch.float64) - height // 2
    v = torch.arange(width, device=device, dtype=torch.float64) - width // 2
    inside = torch.sqrt(u[:, None] ** 2 + v[None, :] ** 2) < radius
    return torch.fft.ifftshift(inside if low else ~inside, dim=(-2, -1)).to(dtype)


def _band(x: torch.Tensor, radius: float, low: bool) -> torch.Tensor:
    """Keep the low (or high) band of x per channel, for the whole batch in one batched FFT; the FFT runs in
    fp32/fp64 whatever x.dtype is."""
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    complex_dtype = torch.complex128 if compute_dtype == torch.float64 else torch.complex64
    mask = _band_mask(x.shape[-2], x.shape[-1], float(radius), low, complex_dtype, x.device)
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
