import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from advcl_dist.config import load_config
from advcl_dist.data.augment import batch_views, crop_flip_view
from advcl_dist.methods.advcl import advcl_views
from advcl_dist.methods.simclr import simclr_views
from advcl_dist.rng import StepRandom
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


# --- all views of an AdvCL batch ----------------------------------------------------------------------------


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_views_made_together_equal_the_views_made_one_by_one():
    """advcl_views (one grid, one jitter pass) = crop_flip_view, simclr_views, high_frequency in turn on the
    same generator, the sequence of the authors' step (bench/reference.py); batch_views likewise."""
    images = _images(12, seed=17)
    cfg = load_config(None, [])
    together = advcl_views(images, StepRandom("cpu", 18).reseed(3), cfg.views, 8.0)
    random = StepRandom("cpu", 18).reseed(3)
    x = crop_flip_view(images, random, size=32, padding=4)
    t1, t2 = simclr_views(images, random, cfg.views)
    for ours, ref in zip(together, (x, t1, t2, high_frequency(x, 8.0))):
        assert torch.equal(ours, ref)
    assert not torch.equal(t1, t2)
    views = batch_views(images, StepRandom("cpu", 19), simclr=3)
    random = StepRandom("cpu", 19)
    assert torch.equal(views[0], crop_flip_view(images, random))
    assert all(torch.equal(a, b) for a, b in zip(views[1:], batch_views(images, random, crop=False, simclr=3)))


def _operators(fn) -> int:
    fn()  # the constants are made on the first call
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def test_all_views_of_a_batch_take_a_fixed_small_number_of_operators():
    """Every view of an AdvCL batch in a number of dispatched operators (CPU profiler events, nested ones
    included) that does not grow with the batch: no loop over samples, views or jitter orders."""
    views_cfg = load_config(None, []).views
    counts = {}
    for batch in (32, 512):
        images = _images(batch)
        counts[batch] = _operators(lambda images=images: advcl_views(images, StepRandom("cpu", 20), views_cfg, 8.0))
    assert counts[32] == counts[512] <= 400, counts
    assert counts[32] > 100  # the profiler saw the views (the per-op version dispatched ~2,700)
