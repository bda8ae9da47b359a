import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from advcl_dist.data.augment import (
    _color_jitter,
    _crop_flip_params,
    _grayscale,
    _random_grayscale,
    _resized_crop,
    _sample_boxes,
    crop_flip_view,
    simclr_view,
    to_float,
)
from advcl_dist.rng import StepRandom


def _gen(seed: int) -> torch.Generator:
    """For test data only: the augmentations draw from a StepRandom."""
    return torch.Generator().manual_seed(seed)


def _random(seed: int) -> StepRandom:
    return StepRandom("cpu", seed)


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), generator=_gen(seed), dtype=torch.uint8)


# --- RandomResizedCrop: resize part -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "size"), [(32, 32, 32), (40, 36, 32), (32, 28, 24), (20, 24, 48)]
)
def test_resized_crop_matches_torchvision(height, width, size):
    batch = 24
    g = _gen(1)
    x = torch.rand(batch, 3, height, width, generator=g)
    box_h = torch.randint(1, height + 1, (batch,), generator=g)
    box_w = torch.randint(1, width + 1, (batch,), generator=g)
    box_h[:4] = torch.tensor([1, height, size if size <= height else height, 2])
    box_w[:4] = torch.tensor([width, 1, size if size <= width else width, 3])
    top = (torch.rand(batch, generator=g) * (height - box_h + 1)).long()
    left = (torch.rand(batch, generator=g) * (width - box_w + 1)).long()
    flip = torch.rand(batch, generator=g) < 0.5
    flip[:2] = torch.tensor([False, True])

    out = _resized_crop(x, top, left, box_h, box_w, flip, size)
    assert out.shape == (batch, 3, size, size) and out.dtype == torch.float32
    for n in range(batch):
        args = (int(top[n]), int(left[n]), int(box_h[n]), int(box_w[n]))
        ref = TF.resized_crop(x[n], *args, [size, size], antialias=False)
        if flip[n]:
            ref = TF.horizontal_flip(ref)
        torch.testing.assert_close(out[n], ref, atol=1e-5, rtol=0, msg=f"sample {n}: box {args}")


# --- RandomResizedCrop: box sampling ------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40), (40, 24)])
def test_boxes_are_valid_and_respect_scale_and_ratio(height, width):
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = _sample_boxes(20000, height, width, _random(2), scale, ratio)
    assert all(t.dtype == torch.int64 for t in (top, left, h, w))
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # h and w are rounded from continuous values, so allow half a pixel each way.
    area = height * width
    hf, wf = h.double(), w.double()
    assert ((hf - 0.5) * (wf - 0.5) <= scale[1] * area).all()
    assert ((hf + 0.5) * (wf + 0.5) >= scale[0] * area).all()
    assert ((wf - 0.5) / (hf + 0.5) <= ratio[1]).all()
    assert ((wf + 0.5) / (hf - 0.5).clamp(min=1e-9) >= ratio[0]).all()
    # Offsets cover their whole range.
    slack_h, slack_w = height - h, width - w
    assert ((top == 0) & (slack_h > 0)).any() and ((top == slack_h) & (slack_h > 0)).any()
    assert ((left == 0) & (slack_w > 0)).any() and ((left == slack_w) & (slack_w > 0)).any()


@pytest.mark.parametrize(("height", "width"), [(32, 32), (20, 40), (40, 20), (30, 36)])
def test_fallback_is_torchvision_central_crop(height, width):
    # A scale above 1 never fits, so every sample must take the fallback.
    scale, ratio = (2.0, 3.0), (3 / 4, 4 / 3)
    ref = RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), list(ratio))
    boxes = torch.stack(_sample_boxes(8, height, width, _random(3), scale, ratio), dim=1)
    assert (boxes == torch.tensor(ref)).all()


def test_box_distribution_matches_torchvision():
    n, height, width = 4000, 32, 32
    scale, ratio = [0.2, 1.0], [3 / 4, 4 / 3]
    img = torch.zeros(3, height, width)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = torch.tensor([RandomResizedCrop.get_params(img, scale, ratio) for _ in range(n)])
    ours = torch.stack(_sample_boxes(n, height, width, _random(4), tuple(scale), tuple(ratio)), dim=1)

    def stats(boxes: torch.Tensor) -> torch.Tensor:
        i, j, h, w = boxes.double().unbind(1)
        area = h * w / (height * width)
        centre_y = (i + h / 2) / height
        centre_x = (j + w / 2) / width
        return torch.stack(
            [area.mean(), area.std(), torch.log(w / h).mean(), centre_y.mean(), centre_x.mean()]
        )

    torch.testing.assert_close(stats(ours), stats(ref), atol=0.015, rtol=0)
    # The histograms of box heights agree (total variation distance).
    hist = [torch.bincount(b[:, 2], minlength=height + 1).double() / n for b in (ours, ref)]
    assert 0.5 * (hist[0] - hist[1]).abs().sum() < 0.07


# --- ColorJitter / RandomGrayscale --------------------------------------------------------------------------


def _jitter_factors(batch: int, seed: int):
    g = _gen(seed)
    brightness = torch.empty(batch).uniform_(0.6, 1.4, generator=g)
    contrast = torch.empty(batch).uniform_(0.6, 1.4, generator=g)
    saturation = torch.empty(batch).uniform_(0.6, 1.4, generator=g)
    hue = torch.empty(batch).uniform_(-0.1, 0.1, generator=g)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(batch)])
    return brightness, contrast, saturation, hue, order


def test_color_jitter_matches_torchvision():
    batch = 32
    x = torch.rand(batch, 3, 16, 12, generator=_gen(5))
    x[0] = 0.5  # grey image: hue undefined
    x[1, :, :4] = 1.0  # saturated pixels
    brightness, contrast, saturation, hue, order = _jitter_factors(batch, 6)
    brightness[2], hue[3] = 1.0, 0.0
    out = _color_jitter(x, brightness, contrast, saturation, hue, order)
    ops = [
        lambda im, n: TF.adjust_brightness(im, float(brightness[n])),
        lambda im, n: TF.adjust_contrast(im, float(contrast[n])),
        lambda im, n: TF.adjust_saturation(im, float(saturation[n])),
        lambda im, n: TF.adjust_hue(im, float(hue[n])),
    ]
    for n in range(batch):
        ref = x[n]
        for op in order[n].tolist():
            ref = ops[op](ref, n)
        torch.testing.assert_close(out[n], ref, atol=1e-5, rtol=0, msg=f"sample {n}, order {order[n]}")


def test_color_jitter_identity_is_exact():
    batch = 8
    x = torch.rand(batch, 3, 16, 16, generator=_gen(7))
    *_, order = _jitter_factors(batch, 8)
    ones, zeros = torch.ones(batch), torch.zeros(batch)
    assert torch.equal(_color_jitter(x, ones, ones, ones, zeros, order), x)


def test_grayscale_matches_torchvision():
    x = torch.rand(6, 3, 8, 8, generator=_gen(9))
    apply = torch.tensor([True, False, True, False, False, True])
    out = _random_grayscale(x, apply)
    for n in range(6):
        ref = TF.rgb_to_grayscale(x[n], num_output_channels=3) if apply[n] else x[n]
        torch.testing.assert_close(out[n], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


# --- crop_flip_view -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "size", "padding"), [(32, 32, 32, 4), (36, 30, 28, 2)])
def test_crop_flip_view_matches_reference(height, width, size, padding):
    batch = 16
    images = _images(batch, height, width, seed=10)
    out = crop_flip_view(images, _random(11), size=size, padding=padding)
    top, left, flip = _crop_flip_params(batch, height, width, _random(11), size, padding, 0.5)
    assert out.shape == (batch, 3, size, size) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert flip.any() and not flip.all()
    assert (top >= 0).all() and (top <= height + 2 * padding - size).all()
    assert (left >= 0).all() and (left <= width + 2 * padding - size).all()
    for n in range(batch):
        padded = TF.pad(images[n], [padding], fill=0)
        ref = padded[:, top[n] : top[n] + size, left[n] : left[n] + size]
        if flip[n]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[n], to_float(ref))


# --- whole views --------------------------------------------------------------------------------------------


def test_to_float():
    images = _images(2, 4, 4)
    assert torch.equal(to_float(images), images.float() / 255)
    half = torch.rand(2, 3, 4, 4).half()
    assert to_float(half).dtype == torch.float32


@pytest.mark.parametrize(("height", "size"), [(32, 32), (40, 32), (24, 32)])
def test_simclr_view_shape_dtype_range(height, size):
    out = simclr_view(_images(64, height, height), _random(12), size=size)
    assert out.shape == (64, 3, size, size) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_simclr_view_identity_settings_return_input():
    images = _images(4, 32, 32)
    out = simclr_view(
        images, _random(13), scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, flip_p=0.0
    )
    # grid_sample's coordinate round trip costs a few 1e-6 even on the identity grid.
    torch.testing.assert_close(out, to_float(images), atol=1e-5, rtol=0)
    gray = simclr_view(images, _random(13), gray_p=1.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_views_are_deterministic_and_per_sample():
    images = _images(1, 32, 32).expand(16, -1, -1, -1)
    for view in (simclr_view, crop_flip_view):
        a, b = view(images, _random(14)), view(images, _random(14))
        assert torch.equal(a, b)
        assert not torch.equal(a, view(images, _random(15)))
        # Same image everywhere, so identical outputs would mean shared parameters.
        flat = a.flatten(1)
        same = (flat[:, None] == flat[None]).all(-1)
        assert same.sum() < 16 + 8, view.__name__
    boxes = torch.stack(_sample_boxes(16, 32, 32, _random(16)), dim=1)
    assert len({tuple(b) for b in boxes.tolist()}) > 12
