import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from advcl_dist.data.augment import (
    SIMCLR_DRAWS,
    TRIES,
    _boxes,
    _constants,
    crop_flip_view,
    simclr_view,
    to_float,
)
from advcl_dist.data.augment_colour import color_jitter, grayscale, random_grayscale
from advcl_dist.rng import StepRandom

JITTER = (0.4, 0.4, 0.4, 0.1)


def _gen(seed: int) -> torch.Generator:
    """For test data only: the augmentations draw from a StepRandom."""
    return torch.Generator().manual_seed(seed)


def _random(seed: int) -> StepRandom:
    return StepRandom("cpu", seed)


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), generator=_gen(seed), dtype=torch.uint8)


# --- SimCLR view: torchvision's transforms per sample, from the same uniforms ----------------------------------


def _reference_params(u, height, width, scale, ratio, jitter=JITTER, jitter_p=0.8, gray_p=0.2, flip_p=0.5):
    """torchvision's RandomResizedCrop / ColorJitter / RandomGrayscale parameters, in Python floats, from one
    sample's SimCLR uniforms: tries (scales, then log-ratios), left, top, flip, apply, 4 factors, order, gray."""
    u = u.double().tolist()
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(TRIES):
        target = height * width * (scale[0] + u[t] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[TRIES + t] * (log_ratio[1] - log_ratio[0]))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = math.floor(u[2 * TRIES] * (width - w + 1)), math.floor(u[2 * TRIES + 1] * (height - h + 1))
            break
    else:
        top, left, h, w = RandomResizedCrop.get_params(torch.zeros(1, height, width), [2.0, 3.0], list(ratio))
    rest = u[2 * TRIES + 2 :]
    low = [max(0.0, 1 - j) for j in jitter[:3]] + [-jitter[3]]
    high = [1 + j for j in jitter[:3]] + [jitter[3]]
    factors = [lo + f * (hi - lo) for lo, f, hi in zip(low, rest[2:6], high)]
    order = sorted(range(4), key=lambda i: rest[6 + i])
    return (top, left, h, w), rest[0] < flip_p, rest[1] < jitter_p, factors, order, rest[10] < gray_p


def _reference_view(image, params, size):
    (top, left, h, w), flip, apply, factors, order, gray = params
    x = TF.resized_crop(image, top, left, h, w, [size, size], antialias=False)
    if flip:
        x = TF.horizontal_flip(x)
    if apply:
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in order:
            x = ops[op](x, factors[op])
    return TF.rgb_to_grayscale(x, num_output_channels=3) if gray else x


@pytest.mark.parametrize(
    ("height", "width", "size", "scale", "ratio"),
    [
        (32, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3)),
        (40, 36, 32, (0.2, 1.0), (3 / 4, 4 / 3)),
        (32, 28, 24, (0.002, 1.0), (1 / 8, 8.0)),  # boxes down to 1 pixel wide or high
        (20, 24, 48, (0.2, 1.0), (3 / 4, 4 / 3)),  # upsampling
        (20, 40, 32, (2.0, 3.0), (3 / 4, 4 / 3)),  # nothing fits: the central fallback
    ],
)
def test_simclr_view_matches_torchvision_per_sample(height, width, size, scale, ratio):
    """Crop, resize, flip, colour jitter in each sample's order and grayscale as torchvision's functional
    transforms do them one image at a time, with the parameters that the view's uniforms give torchvision's
    RandomResizedCrop, ColorJitter and RandomGrayscale. Tolerance: grid_sample's coordinate round trip
    (a few 1e-6) carried through the colour ops."""
    batch = 48
    images = _images(batch, height, width, seed=1)
    out = simclr_view(images, _random(2), size=size, scale=scale, ratio=ratio)
    u = _random(2).rand((batch, SIMCLR_DRAWS))
    assert out.shape == (batch, 3, size, size) and out.dtype == torch.float32
    sizes = set()
    for n in range(batch):
        params = _reference_params(u[n], height, width, scale, ratio)
        sizes.add(params[0][2:])
        ref = _reference_view(to_float(images[n]), params, size)
        torch.testing.assert_close(out[n], ref, atol=1e-5, rtol=0, msg=f"sample {n}: {params}")
    assert len(sizes) == 1 if scale[0] > 1 else len(sizes) > batch // 2  # the fallback box, or many boxes


# --- RandomResizedCrop: box sampling ------------------------------------------------------------------------


def _simclr_boxes(u, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) int64, as torchvision orders them, of SimCLR uniforms u [n, draws]."""
    k = _constants(u.device, height, width, 32, 0, 0, 1, tuple(scale), tuple(ratio), 0.5, JITTER, 0.8, 0.2)
    start, length, _ = _boxes(None, u[:, None], k)
    (left, top), (w, h) = start[:, 0].long().unbind(1), length[:, 0].long().unbind(1)
    return top, left, h, w


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40), (40, 24)])
def test_boxes_are_valid_and_respect_scale_and_ratio(height, width):
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = _simclr_boxes(_random(2).rand((20000, SIMCLR_DRAWS)), height, width, scale, ratio)
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
    boxes = torch.stack(_simclr_boxes(_random(3).rand((8, SIMCLR_DRAWS)), height, width, scale, ratio), dim=1)
    assert (boxes == torch.tensor(ref)).all()


def test_box_distribution_matches_torchvision():
    n, height, width = 4000, 32, 32
    scale, ratio = [0.2, 1.0], [3 / 4, 4 / 3]
    img = torch.zeros(3, height, width)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = torch.tensor([RandomResizedCrop.get_params(img, scale, ratio) for _ in range(n)])
    ours = torch.stack(_simclr_boxes(_random(4).rand((n, SIMCLR_DRAWS)), height, width, scale, ratio), dim=1)

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
    factors = torch.empty(batch, 4)
    factors[:, :3].uniform_(0.6, 1.4, generator=g)
    factors[:, 3].uniform_(-0.1, 0.1, generator=g)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(batch)])
    return factors, order


def test_color_jitter_matches_torchvision():
    batch = 48
    x = torch.rand(batch, 3, 16, 12, generator=_gen(5))
    x[0] = 0.5  # grey image: hue undefined
    x[1, :, :4] = 1.0  # saturated pixels
    x[2, :, 2] = torch.tensor([0.3, 0.7, 0.7]).view(3, 1)  # ties for the maximum: G and B
    x[3, :, 3] = torch.tensor([0.6, 0.6, 0.1]).view(3, 1)  # ties for the maximum: R and G
    factors, order = _jitter_factors(batch, 6)
    factors[4, 0], factors[5, 3] = 1.0, 0.0
    out = color_jitter(x, factors, order)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for n in range(batch):
        ref = x[n]
        for op in order[n].tolist():
            ref = ops[op](ref, float(factors[n, op]))
        torch.testing.assert_close(out[n], ref, atol=1e-5, rtol=0, msg=f"sample {n}, order {order[n]}")
    # Several views per sample ([N, 3, V, H, W], factors [N, V, 4]) are the same images one by one.
    views = color_jitter(x.view(4, 12, 3, 16, 12).transpose(1, 2), factors.view(4, 12, 4), order.view(4, 12, 4))
    torch.testing.assert_close(views.transpose(1, 2).reshape(out.shape), out, atol=1e-6, rtol=0)


def test_color_jitter_identity_is_exact():
    batch = 8
    x = torch.rand(batch, 3, 16, 16, generator=_gen(7))
    _, order = _jitter_factors(batch, 8)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(batch, 4)
    assert torch.equal(color_jitter(x, identity, order), x)


def test_grayscale_matches_torchvision():
    x = torch.rand(6, 3, 8, 8, generator=_gen(9))
    apply = torch.tensor([True, False, True, False, False, True])
    out = random_grayscale(x, apply)
    for n in range(6):
        ref = TF.rgb_to_grayscale(x[n], num_output_channels=3) if apply[n] else x[n]
        torch.testing.assert_close(out[n], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


# --- crop_flip_view -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "size", "padding"), [(32, 32, 32, 4), (36, 30, 28, 2), (96, 96, 96, 12)])
def test_crop_flip_view_matches_reference(height, width, size, padding):
    """Exact pixels of torchvision's pad + crop + hflip, at the offsets its uniforms (left, top, flip) give."""
    batch = 16
    images = _images(batch, height, width, seed=10)
    out = crop_flip_view(images, _random(11), size=size, padding=padding)
    u = _random(11).rand((batch, 3)).double()
    left = torch.floor(u[:, 0] * (width + 2 * padding - size + 1)).long()
    top = torch.floor(u[:, 1] * (height + 2 * padding - size + 1)).long()
    flip = u[:, 2] < 0.5
    assert out.shape == (batch, 3, size, size) and out.dtype == torch.float32
    assert flip.any() and not flip.all()
    assert (top < padding).any() and (left < padding).any()  # some crops reach into the padding
    for n in range(batch):
        padded = TF.pad(images[n], [padding], fill=0)
        ref = padded[:, top[n] : top[n] + size, left[n] : left[n] + size]
        if flip[n]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[n], to_float(ref)), n


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
    boxes = torch.stack(_simclr_boxes(_random(16).rand((16, SIMCLR_DRAWS)), 32, 32), dim=1)
    assert len({tuple(b) for b in boxes.tolist()}) > 12
