"""Tests for advcl_dist.data: readers against files written here in the real formats, sampler, loader."""

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from advcl_dist.config import ConfigError, load_config
from advcl_dist.data import (
    DATASETS,
    DatasetNotFoundError,
    IndexedDataset,
    ShardedSampler,
    build_loader,
    get_dataset,
    ordered_batches,
    safe_pickle,
)
from advcl_dist.data.datasets import digits_pixels
from advcl_dist.data.scan import merge, problems, scan_images, scan_paths
from advcl_dist.data.source import training_data
from dataset_files import (
    py2_pickle_to,
    truncate,
    write_cifar10,
    write_cifar100,
    write_image_classes,
    write_imagefolder,
    write_stl10,
)


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


class Payload:
    """What a crafted CIFAR file could carry: unpickling it runs a shell command (here: creates a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_cifar_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    crafted = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "batch_label": Payload(marker)})
    batch.write_bytes(crafted)
    with pytest.raises(ConfigError, match=r"data_batch_1 .*posix\.system.*data\.download=true"):
        get_dataset("cifar10", "train", root=tmp_path)
    assert not marker.exists()
    get_dataset("cifar10", "test", root=tmp_path)  # the other split does not read that file
    pickle.loads(crafted)  # the payload is live: a plain pickle.load (torchvision's) runs it
    assert marker.exists()


def test_cifar_files_pickled_like_the_official_ones_read_as_plain_pickle_reads_them(tmp_path):
    """Python 2's protocol 2 with `numpy.core.multiarray` names, and today's protocol with `numpy._core`."""
    expected = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for path in sorted(folder.iterdir()):
        entry = safe_pickle.load(path)
        with warnings.catch_warnings():  # numpy >= 2 warns on the `numpy.core` name of the official files
            warnings.simplefilter("ignore", DeprecationWarning)
            py2_pickle_to(path, entry)
            with open(path, "rb") as f:
                plain = pickle.load(f, encoding="latin1")
        assert (b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()) == ("data" in entry)
        again = safe_pickle.load(path)
        assert again.keys() == plain.keys() == entry.keys()
        for key in plain:
            np.testing.assert_array_equal(np.asarray(again[key]), np.asarray(plain[key]))
    _assert_matches(get_dataset("cifar10", "train", root=tmp_path), *expected["train"])


def test_a_cifar_file_that_is_not_a_pickle_is_named(tmp_path):
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cifar-100-python/meta is not a readable CIFAR file"):
        get_dataset("cifar100", "test", root=tmp_path)


def _imagefolder_cfg(root, *extra):
    return load_config(None, ["data.name=imagefolder", f"data.root={root}", "data.workers=2", *extra]).data


def _train(data):
    """training_data, then one epoch, as the trainer reads it."""
    loaded = training_data(data, 2, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    loaded.loader.set_epoch(0)
    return list(loaded.loader)


def test_the_scan_names_a_corrupt_image_before_training(tmp_path):
    paths = write_image_classes(tmp_path / "train", {"cat": [(12, 12)] * 3, "dog": [(12, 12)] * 3})
    truncate(paths[4])
    with pytest.raises(ConfigError) as info:
        training_data(_imagefolder_cfg(tmp_path, "data.scan=true"), 2, seed=0, rank=0, world_size=1,
                      device=torch.device("cpu"))
    message = str(info.value)
    assert message.startswith("data.scan: 1 of 6 images") and f"{paths[4]} is unreadable" in message
    assert "decode_png" in message and ".cpp:" not in message and "\n" not in message


@pytest.mark.parametrize("workers", [0, 1])
def test_without_the_scan_the_loader_names_a_corrupt_image(tmp_path, workers):
    """Also from a DataLoader worker process: a ConfigError with the reader's message, not a traceback."""
    paths = write_image_classes(tmp_path / "train", {"cat": [(12, 12)] * 2, "dog": [(12, 12)] * 2})
    truncate(paths[1])
    with pytest.raises(ConfigError) as info:
        _train(_imagefolder_cfg(tmp_path, f"data.workers={workers}", "data.image_size=8"))
    assert str(info.value).startswith(f"cannot read image {paths[1]} (RuntimeError: ")
    assert "data.scan=true" in str(info.value) and "Traceback" not in str(info.value)
    with pytest.raises(ConfigError, match=f"cannot read image {paths[1]}"):
        get_dataset("imagefolder", "train", root=tmp_path)[1]


def test_mixed_sizes_without_image_size_are_named_with_the_fix(tmp_path):
    paths = write_image_classes(tmp_path / "train", {"cat": [(12, 20), (12, 20), (9, 7)], "dog": [(12, 20)] * 3})
    with pytest.raises(ConfigError) as info:
        training_data(_imagefolder_cfg(tmp_path, "data.scan=true"), 2, seed=0, rank=0, world_size=1,
                      device=torch.device("cpu"))
    assert str(info.value) == (
        f"data.scan: 1 of 6 images under {tmp_path / 'train'} cannot be trained on: {paths[2]} is 7×9. Images "
        "are batched at their own size, and most (5) are 20×12: set data.image_size=N to resize and center-crop "
        "every image to N×N (e.g. data.image_size=12).")
    with pytest.raises(ConfigError, match=rf"{paths[2]} is 7×9.*data\.image_size=N") as info:
        _train(_imagefolder_cfg(tmp_path, "data.workers=1"))  # the batch holding paths[2]
    assert "Traceback" not in str(info.value)
    subset = torch.utils.data.Subset(get_dataset("imagefolder", "train", root=tmp_path), [1, 2])  # evaluation
    with pytest.raises(ConfigError, match=rf"{paths[1]} is 20×12, {paths[2]} is 7×9\. Set data\.image_size=N"):
        list(ordered_batches(subset, 2, None, "cpu"))
    assert sum(len(b[2]) for b in _train(_imagefolder_cfg(tmp_path, "data.scan=true", "data.image_size=8"))) == 6


def test_findings_of_rank_shares_merge_to_the_whole_scans(tmp_path):
    """Each rank of a launch decodes every world_size-th file; the merged findings are the whole scan's."""
    sizes = {"a": [(8, 8), (5, 6), (8, 8), (8, 8)], "b": [(8, 8), (6, 5), (8, 8)]}
    paths = [str(p) for p in write_image_classes(tmp_path, sizes)]
    truncate(Path(paths[3]))
    whole = scan_paths(paths, range(len(paths)), threads=2, progress=False)
    shares = [scan_paths(paths, range(r, len(paths), 3), threads=1, progress=False) for r in range(3)]
    assert problems(merge(shares), None, "x") == problems(whole, None, "x")
    assert problems(whole, None, "x").startswith("data.scan: 3 of 7 images under x")
    assert problems(whole, 8, "x").startswith("data.scan: 1 of 7 images")



def test_ranks_of_a_launch_share_the_scan_and_raise_the_same_error(tmp_path, monkeypatch):
    """Under a process group each rank decodes every world_size-th file, and the findings of all ranks are
    gathered (here rank 1 of 2, with the gather answered in-process by rank 0's share)."""
    import torch.distributed as dist

    from advcl_dist.data import scan

    paths = write_image_classes(tmp_path / "train", {"a": [(8, 8)] * 3 + [(5, 6)], "b": [(8, 8)] * 3})
    truncate(paths[5])
    dataset = get_dataset("imagefolder", "train", root=tmp_path)
    decoded = []
    monkeypatch.setattr(scan, "probe", lambda path, probe=scan.probe: decoded.append(path) or probe(path))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def gather(parts, part):
        all_paths = [path for path, _ in dataset.samples]
        parts[:] = [scan_paths(all_paths, range(0, 7, 2), threads=1, progress=False), part]

    monkeypatch.setattr(dist, "all_gather_object", gather)
    with pytest.raises(ConfigError) as info:
        scan_images(dataset, workers=2, image_size=None, rank=1, world_size=2, progress=False)
    assert sorted(decoded) == sorted(str(paths[i]) for i in (1, 3, 5, 0, 2, 4, 6))  # rank 1's, then rank 0's
    assert decoded[:3] == [str(paths[i]) for i in (1, 3, 5)]
    whole = scan_paths([str(p) for p in paths], range(7), threads=1, progress=False)
    assert str(info.value) == problems(whole, None, str(tmp_path / "train"))
    assert str(info.value).startswith("data.scan: 2 of 7 images") and f"{paths[5]} is unreadable" in str(info.value)
