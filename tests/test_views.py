import numpy as np
import pytest
import torch

from advcl_dist.views import high_frequency, low_frequency


def _reference(x: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Paper eq. (8) in numpy float64: shifted spectrum, disk mask around (H//2, W//2), inverse."""
    height, width = x.shape[-2:]
    mask = np.zeros((height, width), dtype=bool)
    for u in range(height):
        for v in range(width):
            mask[u, v] = np.sqrt((u - height // 2) ** 2 + (v - width // 2) ** 2) < radius
    spectrum = np.fft.fftshift(np.fft.fft2(x.astype(np.float64), axes=(-2, -1)), axes=(-2, -1))

    def back(masked: np.ndarray) -> np.ndarray:
        return np.real(np.fft.ifft2(np.fft.ifftshift(masked, axes=(-2, -1)), axes=(-2, -1)))

    return back(spectrum * mask), back(spectrum * ~mask)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 3, 31, 33)])
@pytest.mark.parametrize("radius", [0.0, 3.5, 8.0, 1e6])
def test_matches_numpy_reference(shape, radius):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    low_ref, high_ref = _reference(x.numpy(), radius)
    low, high = low_frequency(x, radius), high_frequency(x, radius)
    np.testing.assert_allclose(low.numpy(), low_ref, atol=1e-5)
    np.testing.assert_allclose(high.numpy(), high_ref, atol=1e-5)
    torch.testing.assert_close(low + high, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 31, 33)])
def test_extreme_radii(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(low_frequency(x, 0.0), torch.zeros_like(x))
    torch.testing.assert_close(high_frequency(x, 0.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(low_frequency(x, 1e6), x, atol=1e-5, rtol=0)
    assert high_frequency(x, 1e6).abs().max() < 1e-6


def test_default_radius_is_8():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(high_frequency(x), high_frequency(x, 8.0))
    assert torch.equal(low_frequency(x), low_frequency(x, 8.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_shape_preserved(dtype):
    x = torch.rand(2, 3, 31, 33, generator=torch.Generator().manual_seed(3)).to(dtype)
    low, high = low_frequency(x), high_frequency(x)
    assert low.shape == high.shape == x.shape
    assert low.dtype == high.dtype == dtype
    low_ref, high_ref = _reference(x.double().numpy(), 8.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    np.testing.assert_allclose(low.double().numpy(), low_ref, atol=tol)
    np.testing.assert_allclose(high.double().numpy(), high_ref, atol=tol)


def test_float64_is_computed_in_float64():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    low_ref, high_ref = _reference(x.numpy(), 5.0)
    np.testing.assert_allclose(low_frequency(x, 5.0).numpy(), low_ref, atol=1e-12)
    np.testing.assert_allclose(high_frequency(x, 5.0).numpy(), high_ref, atol=1e-12)


def test_bfloat16_under_autocast():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        high = high_frequency(x.bfloat16())
    assert high.dtype == torch.bfloat16
    _, high_ref = _reference(x.bfloat16().double().numpy(), 8.0)
    np.testing.assert_allclose(high.double().numpy(), high_ref, atol=2e-2)
