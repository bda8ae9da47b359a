"""Deterministic, resumable, rank-sharded loading of uint8 image batches.

The order of every epoch depends only on (seed, epoch), so all ranks agree on it and a resumed run replays it.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from advcl_dist.config_schema import ConfigError
from advcl_dist.data.augment import to_float
from advcl_dist.data.datasets import sample_path


class IndexedDataset(Dataset):
    """Yields ``(image uint8 [3,S,S], label, index)``; the index lets callers key per-sample state.

    With ``indices`` only those samples are read (position i is dataset index ``indices[i]``), and the
    index yielded is still the dataset's.
    """

    def __init__(self, dataset: Dataset, image_size: int | None = None, indices=None):
        self.dataset = dataset
        self.image_size = image_size
        self.indices = None if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int]:
        index = position if self.indices is None else self.indices[position]
        image, label = self.dataset[index]
        if self.image_size is not None:
            image = resize_center_crop(image, self.image_size)
        return image, int(label), index

    def sample_name(self, index: int) -> str:
        """The file of dataset index ``index`` where there is one (ImageFolder), else ``sample <index>``."""
        return sample_path(self.dataset, index) or f"sample {index}"


class BadBatch:
    """A batch that could not be made, carrying the user-facing message in place of the images.

    A DataLoader worker turns an exception into a traceback text, so the user would see a page of
    traceback instead of the file to fix; this object crosses the process boundary intact instead, and
    `Loader.__iter__` raises its message as a ConfigError in the main process."""

    def __init__(self, message: str):
        self.message = message


class _ReportingDataset(Dataset):
    """What the DataLoader reads: `IndexedDataset` items, or a `BadBatch` for a sample that is a user error."""

    def __init__(self, indexed: IndexedDataset):
        self.indexed = indexed

    def __len__(self) -> int:
        return len(self.indexed)

    def __getitem__(self, position: int):
        try:
            return self.indexed[position]
        except ConfigError as err:  # e.g. an unreadable image, named by the reader
            return BadBatch(str(err))


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size``, then a central square crop, so that variable-size images batch together."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    from torchvision.transforms.v2 import functional as TF  # only for images of another size (import: ~2 s)

    image = TF.resize(image, [size], antialias=True)
    return TF.center_crop(image, [size, size])


class ShardedSampler(Sampler[int]):
    """Per-rank share of a (seed + epoch)-seeded permutation, padded or truncated like DistributedSampler."""

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank gets in a full epoch (no skip)."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return math.ceil(self.num_samples / self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; skip this rank's first ``start`` samples until the next set_epoch."""
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start must be in [0, {self.samples_per_rank}], got {start}")
        self.epoch = epoch
        self.start = start

    def rank_indices(self) -> list[int]:
        """This rank's full list for the current epoch, ignoring ``start``."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        total = self.samples_per_rank * self.world_size
        if total <= len(order):
            order = order[:total]
        else:
            repeats = math.ceil(total / len(order))
            order = order.repeat(repeats)[:total]
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start :])

    def __len__(self) -> int:
        return self.samples_per_rank - self.start


def collate(batch: list, name: Callable[[int], str] | None = None):
    """Stack into images uint8 [B,3,S,S], labels int64 [B], indices int64 [B].

    A `BadBatch` item, or images of different sizes, give a `BadBatch` naming the sample (``name(index)``)."""
    bad = next((item for item in batch if isinstance(item, BadBatch)), None)
    if bad is not None:
        return bad
    images, labels, indices = zip(*batch)
    if len({tuple(image.shape) for image in images}) > 1:
        return BadBatch(mixed_sizes_message(images, indices, name or (lambda index: f"sample {index}")))
    return (
        torch.stack(images),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(indices, dtype=torch.int64),
    )


def size_text(image: torch.Tensor) -> str:
    """``W×H`` of a [3,H,W] image, the way image viewers and file managers give sizes."""
    return f"{image.shape[-1]}×{image.shape[-2]}"


def mixed_sizes_message(images, indices, name: Callable[[int], str], listed: int = 3) -> str:
    """Which samples of a batch differ from its most common size (all, if no size repeats), and the
    data.image_size fix."""
    sizes = Counter(size_text(image) for image in images)
    common, count = sizes.most_common(1)[0]
    odd = [(name(int(index)), size_text(image)) for image, index in zip(images, indices)
           if count == 1 or size_text(image) != common]
    shown = ", ".join(f"{path} is {size}" for path, size in odd[:listed])
    more = f" and {len(odd) - listed} more" if len(odd) > listed else ""
    most = f", but {count} of the batch's {len(images)} images are {common}" if count > 1 else ""
    side = min(int(v) for v in common.split("×"))
    return (f"images of different sizes cannot be batched: {shown}{more}{most}. Set data.image_size=N to resize "
            f"and center-crop every image to N×N (e.g. data.image_size={side}); data.scan=true lists every "
            "odd-sized file before training.")


class Loader:
    """A DataLoader over a ShardedSampler that can resume mid-epoch without reading the skipped batches.

    ``dataset`` is the torchvision dataset it reads (None for `FFCVLoader`, which reads a .beton).
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ShardedSampler, dataloader: DataLoader):
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = dataloader.drop_last
        self._dataloader = dataloader

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a full epoch on this rank, ignoring any skip."""
        samples = self.sampler.samples_per_rank
        return samples // self.batch_size if self.drop_last else math.ceil(samples / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip its first ``start_batch`` batches (resume)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self.sampler.set_epoch(epoch, start=min(start_batch * self.batch_size, self.sampler.samples_per_rank))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in self._dataloader:
            if isinstance(batch, BadBatch):
                raise ConfigError(batch.message)
            yield batch

    def __len__(self) -> int:
        return len(self._dataloader)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    image_size: int | None = None,
    pin_memory: bool | None = None,
    indices=None,
) -> Loader:
    """Per-rank loader of ``(images, labels, indices)`` batches; ``batch_size`` is per rank; ``indices``
    restricts it to those dataset indices (which the batches still report)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indexed = IndexedDataset(dataset, image_size=image_size, indices=indices)
    sampler = ShardedSampler(
        len(indexed), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last
    )
    # Workers' base seed is drawn from this generator, so the global RNG of the main process is not touched.
    generator = torch.Generator()
    generator.manual_seed(seed)
    dataloader = DataLoader(
        _ReportingDataset(indexed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=functools.partial(collate, name=indexed.sample_name),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=generator,
    )
    return Loader(dataset, batch_size, sampler, dataloader)


def subset(dataset, indices) -> Dataset:
    """``dataset`` restricted to ``indices``; a .beton (`BetonImages`) stays one, to be decoded by FFCV."""
    return dataset.subset(indices) if hasattr(dataset, "subset") else Subset(dataset, indices)


def ordered_batches(dataset: Dataset, batch_size: int, image_size: int | None, device: torch.device | str):
    """Float [0, 1] images and labels on `device`, in dataset-index order (evaluation, feature extraction)."""
    if hasattr(dataset, "ordered_batches"):  # a .beton (`BetonImages`)
        yield from dataset.ordered_batches(batch_size, image_size, device)
        return
    loader = build_loader(dataset, batch_size, shuffle=False, drop_last=False, image_size=image_size)
    loader.set_epoch(0)
    for images, labels, _ in loader:
        yield to_float(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
