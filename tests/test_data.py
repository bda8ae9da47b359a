"""Tests for advcl_dist.data: readers against files written here in the real formats, sampler, loader."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from advcl_dist.data import (
    DATASETS,
    DatasetNotFoundError,
    IndexedDataset,
    ShardedSampler,
    build_loader,
    get_dataset,
)
from advcl_dist.data.datasets import digits_pixels
from dataset_files import write_cifar10, write_cifar100, write_imagefolder, write_stl10


def _assert_matches(dataset, images, labels):
    assert len(dataset) == len(images) == len(labels)
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == images[i].shape
        assert torch.equal(image, torch.from_numpy(np.ascontiguousarray(images[i])))
        assert isinstance(label, int) and label == labels[i]


def test_digits_are_scikit_learns_load_digits():
    """Read from scikit-learn's data file without importing scikit-learn: the same pixels and labels."""
    pixels, labels = digits_pixels()
    reference = load_digits()
    assert pixels.dtype == reference.images.dtype and pixels.shape == reference.images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(pixels, reference.images)
    np.testing.assert_array_equal(labels, reference.target)


def test_digits_shapes_split_and_determinism():
    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert torch.equal(get_dataset("digits", "test")[5][0], test[5][0])

    digits = load_digits()
    perm = np.random.default_rng(0).permutation(len(digits.target))
    assert [test[i][1] for i in range(len(test))] == digits.target[perm[-360:]].tolist()
    assert [train[i][1] for i in range(len(train))] == digits.target[perm[:-360]].tolist()

    all_images = [ds[i][0] for ds in (train, test) for i in range(len(ds))]
    assert int(max(img.max() for img in all_images)) > 200  # scaled from 0..16 to 0..255
    assert len({img.numpy().tobytes() for img in all_images}) == 1797  # disjoint and complete
    # 4x4 average pooling roughly recovers the 8x8 source image (scaled to 0..255).
    pooled = torch.nn.functional.avg_pool2d(test[0][0][:1].float()[None], 4)[0, 0]
    source = torch.from_numpy(digits.images[perm[-360]]).float() * 255 / 16
    assert (pooled - source).abs().mean() < 25


def test_cifar10_reads_exact_pixels(tmp_path):
    expected = write_cifar10(tmp_path)
    for split in ("train", "test"):
        _assert_matches(get_dataset("cifar10", split, root=tmp_path), *expected[split])


def test_cifar100_reads_exact_pixels(tmp_path):
    expected = write_cifar100(tmp_path)
    for split in ("train", "test"):
        _assert_matches(get_dataset("cifar100", split, root=str(tmp_path)), *expected[split])


def test_stl10_reads_exact_pixels(tmp_path):
    expected = write_stl10(tmp_path)
    for split in ("train", "test", "unlabeled"):
        _assert_matches(get_dataset("stl10", split, root=tmp_path), *expected[split])
    train, unlabeled = expected["train"], expected["unlabeled"]
    both = get_dataset("stl10", "train+unlabeled", root=tmp_path)
    _assert_matches(both, np.concatenate([train[0], unlabeled[0]]), train[1] + unlabeled[1])


def test_imagefolder_reads_exact_pixels(tmp_path):
    expected = write_imagefolder(tmp_path)
    for split in ("train", "test"):
        images, labels = zip(*expected[split])
        _assert_matches(get_dataset("imagefolder", split, root=tmp_path), images, labels)


FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}


@pytest.mark.parametrize("name,folder", [*FOLDERS.items(), ("imagefolder", "train")])
def test_missing_data_fails_early(tmp_path, name, folder):
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        get_dataset(name, "train", root=None)
    with pytest.raises(FileNotFoundError) as info:
        get_dataset(name, "train", root=tmp_path)
    assert isinstance(info.value, DatasetNotFoundError)
    assert str(tmp_path / folder) in str(info.value) and "data.root" in str(info.value)


def test_missing_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_4"):
        get_dataset("cifar10", "test", root=tmp_path)


def test_unknown_name_or_split():
    with pytest.raises(ValueError, match="mnist") as info:
        get_dataset("mnist", "train")
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(ValueError, match="val"):
        get_dataset("cifar10", "val", root="/nonexistent")
    with pytest.raises(ValueError, match="unlabeled"):
        get_dataset("digits", "unlabeled")


def test_indexed_dataset_resizes_and_center_crops(tmp_path):
    write_imagefolder(tmp_path)
    dataset = get_dataset("imagefolder", "train", root=tmp_path)
    assert dataset[0][0].shape == (3, 12, 20)
    indexed = IndexedDataset(dataset, image_size=8)
    image, label, index = indexed[3]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert (label, index) == (dataset[3][1], 3)
    assert torch.equal(image, indexed[3][0])  # no randomness

    square = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    from advcl_dist.data.loader import resize_center_crop

    assert torch.equal(resize_center_crop(square, 8), square)
    flat = torch.full((3, 12, 20), 77, dtype=torch.uint8)
    assert torch.equal(resize_center_crop(flat, 6), torch.full((3, 6, 6), 77, dtype=torch.uint8))
    assert IndexedDataset(dataset)[0][0].shape == (3, 12, 20)


def _ranks(n, world_size=2, **kwargs):
    return [ShardedSampler(n, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_ranks_partition_the_epoch(drop_last):
    samplers = _ranks(10, shuffle=True, seed=3, drop_last=drop_last)
    for epoch in range(3):
        for s in samplers:
            s.set_epoch(epoch)
        parts = [list(s) for s in samplers]
        assert [len(p) for p in parts] == [5, 5] == [len(s) for s in samplers]
        assert sorted(parts[0] + parts[1]) == list(range(10))


def test_sampler_pads_or_truncates_like_distributed_sampler():
    padded = [list(s) for s in _ranks(7, shuffle=False, drop_last=False)]
    assert padded == [[0, 2, 4, 6], [1, 3, 5, 0]]
    truncated = [list(s) for s in _ranks(7, shuffle=False, drop_last=True)]
    assert truncated == [[0, 2, 4], [1, 3, 5]]
    tiny = [list(s) for s in _ranks(2, world_size=3, shuffle=False, drop_last=False)]
    assert tiny == [[0], [1], [0]]


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = ShardedSampler(50, shuffle=True, seed=7), ShardedSampler(50, shuffle=True, seed=7)
    torch.manual_seed(0)
    a.set_epoch(4)
    torch.manual_seed(1)
    b.set_epoch(4)
    assert list(a) == list(b) != list(range(50))
    assert list(a) == list(a)
    b.set_epoch(5)
    assert list(a) != list(b)
    assert list(ShardedSampler(50, shuffle=True, seed=8)) != list(ShardedSampler(50, shuffle=True, seed=7))
    assert list(ShardedSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_start_skips_this_epoch_only():
    sampler = ShardedSampler(21, shuffle=True, seed=2, rank=1, world_size=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    sampler.set_epoch(3)
    assert list(sampler) == full
    with pytest.raises(ValueError):
        sampler.set_epoch(3, start=len(full) + 1)


def _tiny_digits(n=23):
    return torch.utils.data.Subset(get_dataset("digits", "test"), range(n))


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_batches_and_resume(drop_last):
    dataset = _tiny_digits()
    loader = build_loader(dataset, 4, shuffle=True, drop_last=drop_last, seed=5, rank=1, world_size=2)
    assert loader.dataset is dataset and loader.batch_size == 4 and isinstance(loader.sampler, ShardedSampler)
    per_rank = 11 if drop_last else 12
    assert loader.batches_per_epoch == (2 if drop_last else 3) == len(loader)

    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == loader.batches_per_epoch
    assert sum(len(b[2]) for b in full) == (8 if drop_last else per_rank)
    for images, labels, indices in full:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
        assert labels.dtype == torch.int64 and indices.dtype == torch.int64
        for image, label, index in zip(images, labels, indices):
            ref_image, ref_label = dataset[int(index)]
            assert torch.equal(image, ref_image) and int(label) == ref_label

    for k in range(loader.batches_per_epoch + 1):
        loader.set_epoch(2, start_batch=k)
        assert len(loader) == loader.batches_per_epoch - k
        skipped = list(loader)
        assert len(skipped) == len(full) - k
        assert all(torch.equal(a[2], b[2]) for a, b in zip(skipped, full[k:]))
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))[2], full[0][2])


def test_loader_keeps_global_rng_and_works_with_workers(tmp_path):
    write_imagefolder(tmp_path)
    dataset = get_dataset("imagefolder", "train", root=tmp_path)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    loader = build_loader(
        dataset, 2, shuffle=True, drop_last=False, workers=1, image_size=8, pin_memory=False
    )
    loader.set_epoch(0)
    full = list(loader)
    assert torch.equal(torch.get_rng_state(), state)
    assert [tuple(b[0].shape) for b in full] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert sorted(torch.cat([b[2] for b in full]).tolist()) == list(range(5))
    loader.set_epoch(0, start_batch=1)  # the persistent worker must follow the new skip
    assert [b[2].tolist() for b in loader] == [b[2].tolist() for b in full[1:]]
